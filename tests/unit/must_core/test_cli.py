"""`must adapt` → `must eval` → `must predict` end to end, as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_ARCH, TINY_CONFIG, make_labelled, write_images

ROOT = Path(__file__).resolve().parents[3]


def _must(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "must_core.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_adapt_eval_predict(tmp_path: Path) -> None:
    classes = ["red", "green", "blue"]
    data = tmp_path / "unlabeled"
    for k, name in enumerate(classes):  # class subfolders: names are ignored for training
        write_images(data / name, 6, seed=10 + k)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "classes.txt").write_text("red\ngreen\nblue\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\na {} thing.\n")
    ev = make_labelled(tmp_path / "eval", ["red", "green", "blue"], per_class=2)
    out = tmp_path / "out"
    r = _must(
        "adapt",
        str(data),
        "--classes",
        str(tmp_path / "classes.txt"),
        "-o",
        str(out),
        "--model",
        TINY_ARCH,
        "--model-config",
        str(TINY_CONFIG),
        "--allow-random-init",
        "--templates",
        str(tmp_path / "templates.txt"),
        "--eval-dir",
        str(ev),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--set",
        "mask_ratio=0.25",
        "--set",
        "progress_every_steps=1",
    )
    assert r.returncode == 0, r.stderr
    assert "status: completed" in r.stdout
    assert "skipped 1" in r.stdout and "corrupt.png" in r.stdout
    assert "zero_shot" in r.stdout and "adapted" in r.stdout
    assert "4/4" in r.stderr and "eta=" in r.stderr  # progress bar with ETA
    model = out / "model.safetensors"
    assert model.is_file()

    r = _must("eval", str(model), str(ev), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["num_images"] == 6 and 0 <= res["top1"] <= 100
    assert set(res["per_class"]) == set(classes)  # keyed by class name

    imgs = sorted((ev / "red").iterdir())
    r = _must("predict", str(model), *map(str, imgs), "--top-k", "2", "--json")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert len(preds) == 2 and all(len(p["top_k"]) == 2 for p in preds)
    assert all(p["label"] in classes for p in preds)


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    write_images(tmp_path / "d", 4)
    r = _must(
        "adapt",
        str(tmp_path / "d"),
        "--class-names",
        "a,b",
        "-o",
        str(tmp_path / "o"),
        "--model",
        TINY_ARCH,
        "--model-config",
        str(TINY_CONFIG),
        "--allow-random-init",
        "--set",
        "mask_ratio=7",
    )
    assert r.returncode == 2
    assert "invalid_config" in r.stderr and "mask_ratio" in r.stderr
    assert "Traceback" not in r.stderr
    r = _must(
        "adapt",
        str(tmp_path / "empty"),
        "--class-names",
        "a,b",
        "-o",
        str(tmp_path / "o"),
        "--model",
        TINY_ARCH,
        "--model-config",
        str(TINY_CONFIG),
        "--allow-random-init",
    )
    assert r.returncode == 2 and "dataset_invalid" in r.stderr
    r = _must(
        "adapt",
        str(tmp_path / "d"),
        "--class-names",
        "a,b",
        "-o",
        str(tmp_path / "o"),
        "--model",
        "ViT-B-16",
        "--pretrained",
        "no-such-tag",
    )
    assert r.returncode == 2
    assert "model_load_failed" in r.stderr and "Traceback" not in r.stderr
    r = _must("predict", str(tmp_path / "nope.safetensors"), str(tmp_path / "d" / "x.png"))
    assert r.returncode == 2 and "model_load_failed" in r.stderr
