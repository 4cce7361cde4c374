"""The ``must`` command line. Each submodule registers its subcommands on the shared parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from must_core.cli import client, engine, service

    parser = argparse.ArgumentParser(
        prog="must", description="Label-free CLIP adaptation (Masked Unsupervised Self-Training)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    engine.register(sub)
    client.register(sub)
    service.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import signal

    if hasattr(signal, "SIGPIPE"):  # `must presets | head` ends quietly, like any Unix tool
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
