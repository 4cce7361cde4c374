"""What a job leaves to look at, against a real worker: the whole training curve after the job
ended, per-class accuracy keyed by class name, the worker's log lines (paged and tailed), and the
label-free sample gallery with predicted-class histograms."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.conftest import job_body
from tests.integration.helpers import Proc, make_images, start_worker, wait_for, wait_job

pytestmark = pytest.mark.integration
CLASSES = ["red", "green", "blue"]
STEPS = 12  # MUST_WORKER__PROGRESS_EVERY_STEPS=1 in the test service: one point per step


@pytest.fixture(scope="module")
def worker(service_env: dict[str, str], log_dir: Path) -> Iterator[Proc]:
    proc = start_worker(service_env, log_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def finished(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str
) -> dict[str, Any]:
    dataset = upload("history/train", make_images(4, CLASSES, seed=3))
    body = job_body(dataset, tiny_config_uri, min_steps=STEPS)
    body["eval_dataset_uri"] = upload("history/eval", make_images(2, CLASSES, seed=4))
    r = client_a.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = wait_job(client_a, r.json()["id"], {"succeeded", "failed"}, 240)
    assert job["status"] == "succeeded", (job, worker.log()[-3000:])
    return job


def test_history_has_every_progress_point(
    finished: dict[str, Any], client_a: httpx.Client, client_b: httpx.Client
) -> None:
    jid = finished["id"]
    h = client_a.get(f"/v1/jobs/{jid}/history").json()
    assert h["status"] == "succeeded"
    assert len(h["points"]) == STEPS // 1  # steps / progress interval
    assert [p["step"] for p in h["points"]] == list(range(1, STEPS + 1))
    for p in h["points"]:
        assert {"loss", "st", "fair", "mim", "align"} <= p["losses"].keys()
        assert 0.0 <= p["conf_ratio"] <= 1.0 and p["lr"] > 0 and p["images_per_second"] > 0
        assert p["total_steps"] == STEPS and p["epoch"] >= 0
    # the run-health intervals (every health_every_steps and at the end) come in their own list
    assert h["health"] and all(e["kind"] == "health" for e in h["health"])
    assert h["health"][-1]["step"] == 12
    later = client_a.get(f"/v1/jobs/{jid}/history", params={"after_step": 9}).json()
    assert [p["step"] for p in later["points"]] == [10, 11, 12]
    huge = client_a.get(f"/v1/jobs/{jid}/history", params={"after_step": 2**31})
    assert huge.status_code == 422  # steps are 32-bit: refused, not a database error
    pc = h["predicted_classes"]
    assert pc["num_images"] == 12
    assert sum(pc["zero_shot"].values()) == sum(pc["adapted"].values()) == 12
    assert client_b.get(f"/v1/jobs/{jid}/history").status_code == 404  # another tenant


def test_per_class_metrics_use_class_names(finished: dict[str, Any]) -> None:
    for key in ("zero_shot", "adapted", "adapted_ema"):
        assert set(finished["metrics"]["eval"][key]["per_class"]) == set(CLASSES)


def test_logs_all_lines_paged_and_tailed(finished: dict[str, Any], client_a: httpx.Client) -> None:
    jid = finished["id"]

    def ended() -> bool:  # the attempt's last lines are written just after its status
        tail = client_a.get(f"/v1/jobs/{jid}/logs", params={"tail": True, "limit": 5}).json()
        return any("job succeeded" in line["message"] for line in tail["items"])

    wait_for(ended, 30, 0.2, what="the attempt's last log line")
    first = client_a.get(f"/v1/jobs/{jid}/logs", params={"limit": 3}).json()
    assert len(first["items"]) == 3 and first["total"] > 3
    assert "claimed job (attempt 1" in first["items"][0]["message"]
    lines: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 7, **({"after": after} if after is not None else {})}
        page = client_a.get(f"/v1/jobs/{jid}/logs", params=params).json()
        if not page["items"]:
            assert page["next_after"] == after
            break
        lines += page["items"]
        after = page["next_after"]
    assert len(lines) == first["total"]
    ids = [line["id"] for line in lines]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    text = "\n".join(line["message"] for line in lines)
    assert "[trainer]" in text and "job succeeded" in text  # runner and trainer lines
    assert {line["attempt"] for line in lines} == {1}
    tail = client_a.get(f"/v1/jobs/{jid}/logs", params={"tail": True, "limit": 2}).json()
    assert [line["id"] for line in tail["items"]] == ids[-2:]
    assert client_a.get(f"/v1/jobs/{jid}/logs", params={"attempt": 2}).json()["total"] == 0
    bad = client_a.get(f"/v1/jobs/{jid}/logs", params={"limit": 0})
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_samples_per_class_with_scores(finished: dict[str, Any], client_a: httpx.Client) -> None:
    jid = finished["id"]
    every = client_a.get(f"/v1/jobs/{jid}/samples", params={"limit": 2}).json()
    assert every["model_id"] == finished["model_id"]
    hist = every["predicted_classes"]["adapted"]
    for name in CLASSES:
        got = [s for s in every["items"] if s["class_name"] == name]
        assert len(got) == min(2, hist[name])
    one = next(n for n in CLASSES if hist[n] > 0)
    r = client_a.get(f"/v1/jobs/{jid}/samples", params={"class": one, "limit": 50}).json()
    assert len(r["items"]) == min(8, hist[one])  # gallery_per_class 8 are stored
    scores = [s["score"] for s in r["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert all(s["thumbnail"].startswith("data:image/jpeg;base64,") for s in r["items"])
    assert all(s["path"].endswith(".png") for s in r["items"])
    unknown = client_a.get(f"/v1/jobs/{jid}/samples", params={"class": "purple"})
    assert unknown.status_code == 422 and unknown.json()["code"] == "validation_error"


def test_samples_go_with_the_model(
    worker: Proc, client_a: httpx.Client, upload: Any, tiny_config_uri: str
) -> None:
    body = job_body(upload("history/small", make_images(2, CLASSES, seed=5)), tiny_config_uri)
    jid = client_a.post("/v1/jobs", json=body).json()["id"]
    early = client_a.get(f"/v1/jobs/{jid}/samples")
    assert early.status_code in (200, 409)  # 409 job_not_finished until it succeeds
    if early.status_code == 409:
        assert early.json()["code"] == "job_not_finished"
    job = wait_job(client_a, jid, {"succeeded", "failed"}, 240)
    assert job["status"] == "succeeded", worker.log()[-3000:]
    assert client_a.get(f"/v1/jobs/{jid}/samples").json()["items"]
    assert client_a.delete(f"/v1/models/{job['model_id']}").status_code == 204
    gone = client_a.get(f"/v1/jobs/{jid}/samples")
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"
    assert len(client_a.get(f"/v1/jobs/{jid}/history").json()["points"]) > 0
