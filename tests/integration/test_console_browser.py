"""The web console and the API docs in real headless Chromium (Debian's ``chromium``, installed by
``scripts/test``, driven by Playwright; no browser is ever downloaded) against a real API and a real worker. Every request to
a host other than the test server is refused, so the pages must work offline.

Screenshots go to ``MUST_SCREENSHOTS_DIR`` (``docs/screenshots`` refreshes the README's), else to
the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.integration.helpers import Proc, make_images, start_worker

pytestmark = [pytest.mark.integration, pytest.mark.browser]
CHROMIUM = os.environ.get("MUST_CHROMIUM", "/usr/bin/chromium")
CLASSES = ["red", "green", "blue"]
LOCAL = {"127.0.0.1", "localhost"}

if not shutil.which(CHROMIUM):
    if os.environ.get("CI"):  # scripts/test installs it: in CI a missing browser is a failure
        raise RuntimeError(f"no Chromium at {CHROMIUM}")
    pytest.skip(f"no Chromium at {CHROMIUM} (scripts/test installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("MUST_SCREENSHOTS_DIR")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A page whose requests to anything but the test server are aborted (and recorded)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    refused: list[str] = []

    def offline(route: Any) -> None:
        url = urlparse(route.request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.hostname not in LOCAL:
            refused.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    context.route("**/*", offline)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.refused = refused
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on any page


def _login(page: Any, api: str, key: str) -> None:
    page.goto(f"{api}/ui/")
    page.fill("#api-key", key)
    page.click("#key-form button")


def test_console_end_to_end(
    page: Any,
    worker: Proc,
    api: str,
    keys: dict[str, str],
    client_a: httpx.Client,
    upload: Any,
    tiny_config_uri: str,
    shots: Path,
    tmp_path: Path,
) -> None:
    images = make_images(4, CLASSES, seed=21)
    dataset = upload("browser/train", images)
    eval_set = upload("browser/eval", make_images(2, CLASSES, seed=22))
    _login(page, api, keys["tenant-a"])

    # submit from the form
    page.goto(f"{api}/ui/#/submit")
    page.fill("#dataset_uri", dataset)
    page.fill("#class_names", "\n".join(CLASSES))
    page.fill("#arch", "must-tiny")
    page.fill("#config_uri", tiny_config_uri)
    page.check("#allow_random_init")  # the tiny test CLIP has no pretrained weights
    page.fill("#eval_dataset_uri", eval_set)
    page.fill("#epochs", "4")
    page.fill("#batch_size", "4")
    page.screenshot(path=str(shots / "submit.png"))
    page.click("#submit")
    page.wait_for_url("**/ui/#/job/*")
    job_id = page.url.rsplit("/", 1)[-1]

    # watch it reach succeeded: the curve is drawn, the gallery filled, the logs shown
    page.wait_for_selector("#job-status .status.succeeded", timeout=240_000)
    page.wait_for_selector("#gallery img", timeout=30_000)
    job = client_a.get(f"/v1/jobs/{job_id}").json()  # finished: what the page shows comes from it
    steps = job["progress"]["total_steps"]
    assert page.inner_text("h2 >> nth=0").startswith(f"Training curves ({steps} points)")
    line = page.locator("#chart-loss polyline[data-series=loss]")
    assert len(line.get_attribute("points").split()) == steps
    assert page.locator("#chart-conf polyline").count() == 1
    assert page.locator("#eval tbody tr").count() == 2 + len(CLASSES)  # top-1, mean, per class
    assert page.locator("#histogram tbody tr").count() == len(CLASSES)
    # the run-health warnings the API reports are on the page (or that there are none)
    codes = [w["code"] for w in job["warnings"]]
    health = page.locator("#job-warnings")
    if codes:
        shown = health.locator("[data-code]")
        assert [shown.nth(i).get_attribute("data-code") for i in range(shown.count())] == codes
    else:
        assert health.inner_text().startswith("no warning")
    page.wait_for_function("document.querySelector('#logs').textContent.includes('job succeeded')")
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    # the jobs list shows it, finished, with its progress bar
    page.goto(f"{api}/ui/#/jobs")
    row = page.locator(f"#jobs tr[data-job='{job_id}']")
    row.wait_for()
    assert "succeeded" in row.inner_text() and "100%" in row.inner_text()
    page.screenshot(path=str(shots / "jobs.png"))

    # classify an image: adapted and zero-shot side by side
    model_id = job["model_id"]
    img = tmp_path / "red.png"
    img.write_bytes(images["red/000.png"])
    page.goto(f"{api}/ui/#/classify?model={model_id}")
    page.wait_for_selector(f"#model option[value='{model_id}']", state="attached")
    page.set_input_files("#image", str(img))
    page.wait_for_selector("#classify-out .card table >> nth=1")
    text = page.inner_text("#classify-out")
    assert "Adapted" in text and "Zero-shot" in text and "red" in text
    page.screenshot(path=str(shots / "classify.png"))

    # delete the model from the models list
    page.goto(f"{api}/ui/#/models")
    page.locator(f"#models tr[data-model='{model_id}']").wait_for()
    page.screenshot(path=str(shots / "models.png"))
    page.once("dialog", lambda dialog: dialog.accept())
    page.click(f"button[data-delete='{model_id}']")
    page.locator(f"#models tr[data-model='{model_id}']").wait_for(state="detached")
    assert client_a.get(f"/v1/models/{model_id}").status_code == 404
    assert page.refused == []


def test_docs_render_offline(page: Any, api: str, shots: Path) -> None:
    page.goto(f"{api}/docs")
    page.wait_for_selector(".swagger-ui .opblock-tag", timeout=30_000)
    page.locator(".opblock-summary-path[data-path='/v1/jobs/{job_id}/history']").first.wait_for()
    page.screenshot(path=str(shots / "docs.png"))
    page.goto(f"{api}/redoc")
    page.get_by_text("/v1/jobs/{job_id}/samples").first.wait_for(timeout=30_000)
    assert page.refused == []  # nothing outside the server was even asked for
