import sys

from must_core.cli import main

sys.exit(main())
