"""/classify against real API processes, PostgreSQL and the S3-compatible server.

The adapted model is produced by the engine in the test and registered through the real store and
database (job row succeeded + adapted_models row), so the server's answers can be compared with the
engine's own predictions on the same file.
"""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from tests.integration.helpers import TINY_CONFIG, free_port, image_bytes, start_api

pytestmark = pytest.mark.integration
CLASSES = ["red", "green", "blue"]
COLORS = [(220, 30, 30), (30, 200, 40), (40, 40, 230)]


def _images(n: int, seed: int = 0) -> list[bytes]:
    return [image_bytes(COLORS[i % 3], seed * 100 + i, size=40 + i) for i in range(n)]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapted tiny model from the engine, plus the fixed base weights it started from."""
    from must_core.ml.config import BaseModelSpec, make_config
    from must_core.ml.model import load_base_model
    from must_core.ml.train import adapt

    root = tmp_path_factory.mktemp("classify-model")
    data = root / "data"
    data.mkdir()
    for i, raw in enumerate(_images(12, seed=7)):
        (data / f"{i}.png").write_bytes(raw)
    spec = BaseModelSpec(arch="must-tiny", config=str(TINY_CONFIG), allow_random_init=True)
    torch.manual_seed(0)
    base = load_base_model(spec)
    weights = root / "base.pt"
    torch.save(base.clip.state_dict(), weights)
    res = adapt(
        make_config(batch_size=4, epochs=1),
        images_dir=data,
        class_names=CLASSES,
        output_dir=root / "out",
        base_model=BaseModelSpec(
            arch="must-tiny", config=str(TINY_CONFIG), checkpoint=str(weights)
        ),
    )
    assert res.model_path is not None
    return {"model": res.model_path, "base_weights": weights}


def _register(
    service_env: dict[str, str], model_path: Path, tenant: str, status: str = "succeeded"
) -> tuple[uuid.UUID, uuid.UUID | None]:
    """Put the model file in the bucket and create the job (+ model) rows for a tenant."""
    from must_core.db.models import AdaptedModel
    from must_core.db.session import make_engine, make_sessionmaker, session_scope
    from must_core.jobs import queries
    from must_core.settings import Settings
    from must_core.storage import make_store
    from must_core.storage.keys import model_key

    settings = Settings(_env_file=None, **_settings_kwargs(service_env))  # type: ignore[call-arg]
    engine = make_engine(settings.database_url, null_pool=True)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as s:
        tenant_row = queries.get_or_create_tenant(s, tenant)
        job = queries.create_job(s, tenant_row.id, {"class_names": CLASSES})
        job.status = status
        job_id = job.id
        model_id = None
        if status == "succeeded":
            key = model_key(job_id)
            make_store(settings).put_file(model_path, key)
            model = AdaptedModel(
                tenant_id=tenant_row.id,
                job_id=job_id,
                class_names=CLASSES,
                base_model={"arch": "must-tiny"},
                metrics={},
                artifact_key=key,
                size_bytes=model_path.stat().st_size,
            )
            s.add(model)
            s.flush()
            job.model_id = model.id
            model_id = model.id
    engine.dispose()
    return job_id, model_id


def _settings_kwargs(env: dict[str, str]) -> dict[str, Any]:
    """MUST_* env → Settings kwargs (nested with '__')."""
    out: dict[str, Any] = {}
    for k, v in env.items():
        if not k.startswith("MUST_"):
            continue
        parts = k[5:].lower().split("__")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        try:
            d[parts[-1]] = json.loads(v) if v.startswith(("[", "{")) else v
        except ValueError:
            d[parts[-1]] = v
    return out


@pytest.fixture(scope="module")
def servers(service_env: dict[str, str], log_dir: Path) -> Any:
    """Two API processes on the same DB/S3: batching on (20 ms window) and off; tight limits."""
    limits = {
        "MUST_CLASSIFY__MAX_IMAGES_PER_REQUEST": "8",
        "MUST_CLASSIFY__MAX_IMAGE_BYTES": "200000",
        "MUST_CLASSIFY__MAX_REQUEST_BYTES": "1000000",
        "MUST_CLASSIFY__MAX_IMAGE_PIXELS": "250000",
        "MUST_CLASSIFY__MAX_WAIT_MS": "20",
    }
    on_env = {**service_env, **limits, "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-cls-on"}
    off_env = {
        **service_env,
        **limits,
        "MUST_CLASSIFY__BATCHING": "false",
        "MUST_DATA_DIR": service_env["MUST_DATA_DIR"] + "-cls-off",
    }
    on, on_url = start_api(on_env, log_dir, free_port())
    off, off_url = start_api(off_env, log_dir, free_port())
    yield {"on": on_url, "off": off_url}
    on.stop()
    off.stop()


@pytest.fixture(scope="module")
def registered(service_env: dict[str, str], model_files: dict[str, Path]) -> dict[str, Any]:
    job_id, model_id = _register(service_env, model_files["model"], "tenant-a")
    running_job, _ = _register(service_env, model_files["model"], "tenant-a", status="running")
    return {"job_id": job_id, "model_id": model_id, "running_job": running_job}


def _client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_classify_matches_engine_and_loads_once(
    servers: dict[str, str],
    registered: dict[str, Any],
    keys: dict[str, str],
    model_files: dict[str, Path],
) -> None:
    from must_core.ml.inference import AdaptedClassifier

    url = servers["on"]
    mid = registered["model_id"]
    imgs = _images(5, seed=3)
    # concurrent first requests: one load
    with _client(url, keys["tenant-a"]) as c, ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda raw: c.post(
                    f"/v1/models/{mid}/classify", files=[("images", ("x.png", raw, "image/png"))]
                ),
                [imgs[0]] * 8,
            )
        )
    assert all(r.status_code == 200 for r in responses), responses[0].text
    assert _metric(url, "must_model_cache_loads_total") == 1.0
    assert _metric(url, "must_model_cache_misses_total") == 1.0

    clf = AdaptedClassifier.load(model_files["model"])
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in imgs]
    with torch.no_grad():
        probs = clf(clf.preprocess_images(pil)).softmax(-1)
    with _client(url, keys["tenant-a"]) as c:
        multi = c.post(
            f"/v1/models/{mid}/classify",
            files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)],
            data={"top_k": "10"},
        )
        js = c.post(
            f"/v1/models/{mid}/classify",
            json={"images": [base64.b64encode(b).decode() for b in imgs], "top_k": 2},
        )
    assert multi.status_code == 200, multi.text
    body = multi.json()
    assert body["model_id"] == str(mid)
    assert len(body["results"]) == 5
    for i, r in enumerate(body["results"]):
        assert len(r["top_k"]) == 3  # top_k bounded by the number of classes
        want = probs[i]
        assert r["label"] == CLASSES[int(want.argmax())]
        assert r["score"] == pytest.approx(float(want.max()), abs=1e-5)
        for t in r["top_k"]:
            assert t["label"] == CLASSES[t["index"]]
            assert t["score"] == pytest.approx(float(want[t["index"]]), abs=1e-5)
    assert js.status_code == 200, js.text
    assert [r["label"] for r in js.json()["results"]] == [r["label"] for r in body["results"]]
    assert all(len(r["top_k"]) == 2 for r in js.json()["results"])
    # the job id works as an alias of its model
    alias = _client(url, keys["tenant-a"]).post(
        f"/v1/models/{registered['job_id']}/classify",
        files=[("images", ("a.png", imgs[0], "image/png"))],
    )
    assert alias.status_code == 200 and alias.json()["model_id"] == str(mid)


def test_batching_on_and_off_give_identical_predictions(
    servers: dict[str, str], registered: dict[str, Any], keys: dict[str, str]
) -> None:
    mid = registered["model_id"]
    imgs = _images(16, seed=11)

    def run(url: str) -> list[dict[str, Any]]:
        with _client(url, keys["tenant-a"]) as c, ThreadPoolExecutor(16) as pool:
            rs = list(
                pool.map(
                    lambda raw: c.post(
                        f"/v1/models/{mid}/classify",
                        files=[("images", ("x.png", raw, "image/png"))],
                    ),
                    imgs,
                )
            )
        assert all(r.status_code == 200 for r in rs), [
            (r.status_code, r.text[:300]) for r in rs if r.status_code != 200
        ][:2]
        return [r.json()["results"][0] for r in rs]

    batches_before = _metric(servers["on"], "must_classify_batch_size_count")
    on, off = run(servers["on"]), run(servers["off"])
    for a, b in zip(on, off, strict=True):
        assert a["label"] == b["label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    batches = _metric(servers["on"], "must_classify_batch_size_count") - batches_before
    images = 16
    assert batches < images  # concurrent requests were merged into fewer forward passes


def test_limits_and_errors(
    servers: dict[str, str], registered: dict[str, Any], keys: dict[str, str]
) -> None:
    url = servers["on"]
    mid = registered["model_id"]
    ok_img = _images(1)[0]
    with _client(url, keys["tenant-a"]) as c:

        def post(**kw: Any) -> httpx.Response:
            return c.post(f"/v1/models/{mid}/classify", **kw)

        def code(r: httpx.Response) -> tuple[int, str]:
            assert r.headers["content-type"].startswith("application/problem+json"), r.text
            return r.status_code, r.json()["code"]

        assert code(post(files=[("images", ("x.png", ok_img, "image/png"))] * 9)) == (
            413,
            "too_many_images",
        )
        big = io.BytesIO()
        Image.frombytes("RGB", (300, 300), bytes(range(256)) * 1055).save(big, "BMP")
        assert code(post(files=[("images", ("big.bmp", big.getvalue(), "image/bmp"))])) == (
            413,
            "image_too_large",
        )
        bomb = io.BytesIO()
        Image.new("L", (1000, 1000)).save(bomb, "PNG")  # 1 M pixels > 250 k, few bytes
        assert code(post(files=[("images", ("bomb.png", bomb.getvalue(), "image/png"))])) == (
            413,
            "image_pixels_exceeded",
        )
        assert code(post(files=[("images", ("t.png", b"not an image", "image/png"))])) == (
            415,
            "not_an_image",
        )
        assert code(
            post(content=b"x" * 2_000_000, headers={"content-type": "application/json"})
        ) == (413, "request_too_large")
        assert code(post(content=b"hello", headers={"content-type": "text/plain"})) == (
            415,
            "unsupported_media_type",
        )
        assert code(post(json={"images": ["!!!"]})) == (415, "not_an_image")
        assert code(post(json={"images": []}))[0] == 422
        assert (
            code(post(json={"images": [base64.b64encode(ok_img).decode()], "top_k": 0}))[0] == 422
        )
        assert code(
            c.post(
                f"/v1/models/{uuid.uuid4()}/classify",
                files=[("images", ("x.png", ok_img, "image/png"))],
            )
        ) == (404, "not_found")
        assert code(
            c.post(
                f"/v1/models/{registered['running_job']}/classify",
                files=[("images", ("x.png", ok_img, "image/png"))],
            )
        ) == (409, "model_not_ready")
    with _client(url, keys["tenant-b"]) as other:
        r = other.post(
            f"/v1/models/{mid}/classify", files=[("images", ("x.png", ok_img, "image/png"))]
        )
        assert r.status_code == 404  # another tenant's model does not exist for you
    r = httpx.post(
        f"{url}/v1/models/{mid}/classify", files=[("images", ("x.png", ok_img, "image/png"))]
    )
    assert r.status_code == 401


def test_zero_shot_endpoint_agrees_with_engine(
    servers: dict[str, str],
    keys: dict[str, str],
    model_files: dict[str, Path],
    upload: Any,
    tiny_config_uri: str,
) -> None:
    from must_core.ml.config import BaseModelSpec
    from must_core.ml.model import build_must_model, load_base_model

    weights_uri = upload("zs-assets", {"base.pt": model_files["base_weights"].read_bytes()})
    base_model = {
        "arch": "must-tiny",
        "config_uri": tiny_config_uri,
        "checkpoint_uri": weights_uri + "base.pt",
    }
    templates = ["a photo of a {}.", "a {} square."]
    imgs = _images(4, seed=5)
    url = servers["on"]
    with _client(url, keys["tenant-a"]) as c:
        body = {
            "base_model": base_model,
            "class_names": CLASSES,
            "templates": templates,
            "images": [base64.b64encode(b).decode() for b in imgs],
            "top_k": 3,
        }
        r1 = c.post("/v1/classify", json=body)
        assert r1.status_code == 200, r1.text
        misses = _metric(url, "must_text_embedding_cache_misses_total")
        r2 = c.post(
            "/v1/classify",
            files=[("images", (f"{i}.png", b, "image/png")) for i, b in enumerate(imgs)],
            data={
                "base_model": json.dumps(base_model),
                "class_names": json.dumps(CLASSES),
                "templates": json.dumps(templates),
                "top_k": "3",
            },
        )
        assert r2.status_code == 200, r2.text
        assert _metric(url, "must_text_embedding_cache_misses_total") == misses  # cached
        bad = c.post("/v1/classify", json={**body, "class_names": ["only-one"]})
        assert bad.status_code == 422
        bad_uri = c.post(
            "/v1/classify",
            json={**body, "base_model": {"arch": "must-tiny", "config_uri": "file:///etc/passwd"}},
        )
        assert bad_uri.status_code in (403, 422)
    spec = BaseModelSpec(
        arch="must-tiny", config=str(TINY_CONFIG), checkpoint=str(model_files["base_weights"])
    )
    engine = build_must_model(load_base_model(spec), CLASSES, templates).eval()
    from must_core.ml.data import eval_transform

    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in imgs]
    tf = eval_transform(load_base_model(spec).preprocess)
    with torch.no_grad():
        probs = engine(torch.stack([tf(p) for p in pil])).softmax(-1)
    for i, r in enumerate(r1.json()["results"]):
        assert r["label"] == CLASSES[int(probs[i].argmax())]
        assert r["score"] == pytest.approx(float(probs[i].max()), abs=1e-4)
    assert r1.json()["results"] == r2.json()["results"]


def test_delete_evicts_from_cache(
    servers: dict[str, str],
    service_env: dict[str, str],
    keys: dict[str, str],
    model_files: dict[str, Path],
) -> None:
    url = servers["on"]
    _, mid = _register(service_env, model_files["model"], "tenant-a")
    img = _images(1)[0]
    with _client(url, keys["tenant-a"]) as c:
        assert (
            c.post(
                f"/v1/models/{mid}/classify", files=[("images", ("x.png", img, "image/png"))]
            ).status_code
            == 200
        )
        before = _metric(url, "must_model_cache_evictions_total")
        assert c.delete(f"/v1/models/{mid}").status_code == 204
        assert _metric(url, "must_model_cache_evictions_total") == before + 1
        r = c.post(f"/v1/models/{mid}/classify", files=[("images", ("x.png", img, "image/png"))])
        assert r.status_code == 404
