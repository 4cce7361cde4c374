"""predict_files (batched, DataLoader decode, bad files skipped), the JSONL/CSV writers, must predict
DIR --out, and the ONNX export checked against torch with ONNX Runtime."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from must_core.ml.data import load_image
from must_core.ml.inference import AdaptedClassifier
from must_core.ml.predict import predict_files, prediction_row, write_csv, write_jsonl
from tests.classifiers import write_classifier
from tests.conftest import write_images
from tests.unit.must_core.test_cli import _must

CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_classifier(tmp_path_factory.mktemp("m") / "model.safetensors", CLASSES)


def _folder(root: Path) -> list[Path]:
    good = write_images(root / "a", 5, seed=1) + write_images(root / "b", 4, seed=2, fmt="jpg")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return good


@pytest.mark.parametrize("num_workers", [0, 2])
def test_predict_files_matches_single_image_predict(
    model_file: Path, tmp_path: Path, num_workers: int
) -> None:
    model = AdaptedClassifier.load(model_file)
    good = _folder(tmp_path)
    paths = [*good[:3], tmp_path / "a" / "broken.png", *good[3:]]
    skipped: list[tuple[Path, str]] = []
    out = list(
        predict_files(
            model,
            paths,
            batch_size=4,
            top_k=2,
            num_workers=num_workers,
            on_skip=lambda p, why: skipped.append((p, why)),
        )
    )
    assert [p for p, _ in out] == good  # input order, bad file left out
    assert skipped == [
        (tmp_path / "a" / "broken.png", "not a decodable image (UnidentifiedImageError)")
    ]
    for path, pred in out:
        ref = model.predict([load_image(path)], top_k=2)[0]
        assert pred.label == ref.label and len(pred.top_k) == 2
        assert pred.score == pytest.approx(ref.score, abs=1e-5)


def test_predict_files_all_bad_and_empty(model_file: Path, tmp_path: Path) -> None:
    model = AdaptedClassifier.load(model_file)
    (tmp_path / "x.jpg").write_bytes(b"nope")
    assert list(predict_files(model, [tmp_path / "x.jpg", tmp_path / "missing.png"])) == []
    assert list(predict_files(model, [])) == []
    with pytest.raises(ValueError, match="batch_size"):
        list(predict_files(model, [tmp_path / "x.jpg"], batch_size=0))


def test_writers_round_trip(model_file: Path, tmp_path: Path) -> None:
    model = AdaptedClassifier.load(model_file)
    good = write_images(tmp_path, 3)
    rows = [prediction_row(p.name, pred) for p, pred in predict_files(model, good, top_k=3)]
    buf = io.StringIO()
    assert write_jsonl(buf, rows) == 3
    assert [json.loads(line) for line in buf.getvalue().splitlines()] == rows
    buf = io.StringIO()
    assert write_csv(buf, rows) == 3
    table = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["path"] for r in table] == [p.name for p in good]
    assert table[0]["top_k_labels"].split("|")[0] == rows[0]["label"]
    assert float(table[0]["score"]) == pytest.approx(rows[0]["score"], abs=1e-6)


def test_cli_predict_folder_to_jsonl(model_file: Path, tmp_path: Path) -> None:
    good = _folder(tmp_path / "imgs")
    out = tmp_path / "preds.jsonl"
    r = _must("predict", str(model_file), str(tmp_path / "imgs"), "--out", str(out), "--top-k", "2")
    assert r.returncode == 1, r.stderr  # one undecodable file: reported, exit 1
    assert "9 predictions written" in r.stdout and "broken.png" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(Path(row["path"]) for row in rows) == sorted(good)
    assert all(row["label"] in CLASSES and len(row["top_k"]) == 2 for row in rows)
    r = _must("predict", str(model_file), str(tmp_path / "imgs"), "--out", str(tmp_path / "p.txt"))
    assert r.returncode == 2 and "invalid_config" in r.stderr


def test_onnx_export_matches_torch(model_file: Path, tmp_path: Path) -> None:
    """ONNX Runtime vs torch on the same preprocessed images; max |Δlogit| must stay below 1e-3."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    out = tmp_path / "model.onnx"
    r = _must("export", str(model_file), "--format", "onnx", "-o", str(out))
    assert r.returncode == 0, r.stderr
    model = AdaptedClassifier.load(model_file)
    images = [load_image(p) for p in write_images(tmp_path / "i", 5, seed=3)]
    x = model.preprocess_images(images)
    with torch.inference_mode():
        ref = model(x).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (x[:1], x):  # dynamic batch
        got = sess.run(["logits"], {"images": batch.numpy()})[0]
        delta = float(np.abs(got - ref[: len(batch)]).max())
        assert got.shape == (len(batch), len(CLASSES))
        assert delta < 1e-3, f"max |Δlogit| = {delta}"
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES and meta["image_size"] == "32"


def test_run_predictions_stops_and_resumes(model_file: Path, tmp_path: Path) -> None:
    """A stopped run hands over its rows; a run given them predicts only the rest, and the final
    files hold every image once (the bad one only in the skipped list)."""
    from must_core.ml.predict import CSV_FILE, JSONL_FILE, run_predictions

    model = AdaptedClassifier.load(model_file)
    good = _folder(tmp_path / "imgs")
    checkpoints: list[tuple[Path, int]] = []

    def keep(path: Path, n: int) -> None:
        dest = tmp_path / f"ckpt-{n}.jsonl"
        dest.write_bytes(path.read_bytes())
        checkpoints.append((dest, n))

    calls = iter([False, True])
    first = run_predictions(
        model,
        tmp_path / "imgs",
        tmp_path / "out1",
        batch_size=1,  # chunks of 4 files: one chunk, then the stop
        should_stop=lambda: next(calls),
        on_checkpoint=keep,
    )
    assert first.status == "stopped" and first.done == 4 and checkpoints[-1][1] == 4
    second = run_predictions(
        model, tmp_path / "imgs", tmp_path / "out2", batch_size=2, resume_rows=checkpoints[-1][0]
    )
    assert second.status == "completed" and second.resumed_from == 4
    assert second.total == 10 and second.num_predicted == 9
    assert second.skipped == [("a/broken.png", "not a decodable image (UnidentifiedImageError)")]
    rows = [json.loads(line) for line in (tmp_path / "out2" / JSONL_FILE).read_text().splitlines()]
    assert sorted(r["path"] for r in rows) == sorted(
        p.relative_to(tmp_path / "imgs").as_posix() for p in good
    )
    assert len((tmp_path / "out2" / CSV_FILE).read_text().splitlines()) == 10  # header + 9
