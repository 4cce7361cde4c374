"""/classify memory under hostile images, measured as the peak RSS of a real API process.

The peak is reset before each request (``/proc/<pid>/clear_refs`` = 5) and read back from ``VmHWM``
afterwards, so each number is what that one request added to the server.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.integration.helpers import Proc, free_port, start_api

pytestmark = pytest.mark.integration
_logger = logging.getLogger(__name__)
MB = 2**20
# Growth allowed per request: one decoded 10 Mpx image in its few transient copies, plus the
# request's bytes. Decoding a whole request at once (the old behaviour) needs gigabytes here.
BOUND = 400 * MB


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _peak_growth(pid: int, send: Any) -> tuple[int, httpx.Response]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _kib(pid, "VmRSS")
    response = send()
    return _kib(pid, "VmHWM") - before, response


@pytest.fixture(scope="module")
def server(service_env: dict[str, str], log_dir: Path) -> Iterator[tuple[Proc, str]]:
    env = {
        **service_env,
        "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-mem",
        "MUST_CLASSIFY__MAX_REQUEST_PIXELS": "700000000",
    }
    proc, url = start_api(env, log_dir, free_port())
    yield proc, url
    proc.stop()


def test_hostile_images_stay_under_the_memory_bound(
    server: tuple[Proc, str], keys: dict[str, str], tiny_config_uri: str
) -> None:
    proc, url = server
    pid = proc.proc.pid
    fields = {
        "base_model": f'{{"arch": "must-tiny", "config_uri": "{tiny_config_uri}", "allow_random_init": true}}',
        "class_names": '["red", "green", "blue"]',
    }
    headers = {"Authorization": f"Bearer {keys['tenant-a']}"}

    def post(images: list[bytes]) -> Any:
        files = [("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(images)]
        return lambda: httpx.post(
            f"{url}/v1/classify", files=files, data=fields, headers=headers, timeout=300
        )

    warm = post([_png(64, 64)])()  # loads the base model and text weights once
    assert warm.status_code == 200, warm.text
    growth = {}
    growth["300000x1"], r = _peak_growth(pid, post([_png(300_000, 1)]))
    assert (r.status_code, r.json()["code"]) == (413, "image_pixels_exceeded"), r.text
    growth["64 x 8000x5000"], r = _peak_growth(pid, post([_png(8000, 5000)] * 64))
    assert (r.status_code, r.json()["code"]) == (413, "image_pixels_exceeded"), r.text
    growth["64 x 4000x2500 (accepted)"], r = _peak_growth(pid, post([_png(4000, 2500)] * 64))
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 64
    growth["12000x3 (cropped)"], r = _peak_growth(pid, post([_png(12_000, 3)]))
    assert r.status_code == 200, r.text
    _logger.warning(
        "peak RSS growth per request: %s", {k: f"{v / MB:.0f} MB" for k, v in growth.items()}
    )
    for name, grown in growth.items():
        assert grown < BOUND, f"{name}: {grown / MB:.0f} MB"
