from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.helpers import ROOT


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc
