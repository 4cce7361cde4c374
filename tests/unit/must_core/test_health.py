"""Label-free run health: a forced collapse is flagged (and not served), a healthy run is not."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from must_core.ml.config import make_config
from must_core.ml.health import Probe, estimate_prior, health_warnings, snapshot
from must_core.ml.train import adapt
from tests.conftest import write_images

CLASSES = ["red", "green", "blue", "yellow", "purple"]
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 230), (230, 230, 30), (200, 40, 200)]


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 images with a 10:1 class prior (40/20/10/6/4)."""
    root = tmp_path_factory.mktemp("imbalanced")
    for k, n in enumerate([40, 20, 10, 6, 4]):
        write_images(root / CLASSES[k], n, seed=k, colour=COLOURS[k])
    return root


def _run(tmp: Path, data: Path, spec: Any, **kw: Any) -> Any:
    # seed 11: a random-weight tiny CLIP whose zero-shot predictions spread over 3 of the 5 classes
    cfg = make_config(
        batch_size=16,
        epochs=1,
        min_steps=30,
        progress_every_steps=5,
        health_every_steps=10,
        mask_ratio=0.0,
        seed=11,
        **kw,
    )
    events: list[dict[str, Any]] = []
    res = adapt(
        cfg,
        images_dir=data,
        class_names=CLASSES,
        output_dir=tmp,
        base_model=spec,
        on_health=events.append,
        resume=False,
        templates=["a photo of {}."],
    )
    return res, events


def test_forced_collapse_is_flagged_and_not_served(
    tmp_path: Path, imbalanced: Path, tiny_spec: Any
) -> None:
    res, events = _run(
        tmp_path / "c", imbalanced, tiny_spec, fair_weight=0.0, lr=1e-2, conf_threshold=0.0
    )
    codes = {w["code"] for w in res.metrics["warnings"]}
    assert "collapsed" in codes, res.metrics["health"]
    assert res.metrics["health"]["max_class_share"] > 0.5
    assert res.metrics["served_model"]["weights"] == "zero_shot", res.metrics["health"][
        "zero_shot_entropy_ratio"
    ]
    # one health event per interval (steps 10, 20) and the final one (30), all in metrics.json
    assert [e["step"] for e in events] == [10, 20, 30]
    assert all(e["kind"] == "health" and set(e["class_counts"]) == set(CLASSES) for e in events)
    saved = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert [h["step"] for h in saved["health"]] == [10, 20, 30]
    assert saved["metrics"]["warnings"] == res.metrics["warnings"]


def test_healthy_run_is_not_flagged(tmp_path: Path, imbalanced: Path, tiny_spec: Any) -> None:
    res, _ = _run(tmp_path / "h", imbalanced, tiny_spec, fair_weight=4.0, lr=1e-5)
    assert res.metrics["warnings"] == [], res.metrics["health"]
    assert res.metrics["served_model"]["weights"] == "student"
    h = res.metrics["health"]
    assert 0.0 <= h["agree_zero_shot"] <= 1.0 and 0.0 <= h["confident_ratio"] <= 1.0
    assert sum(h["class_counts"].values()) == h["num_images"] == 80


def _probe(pred: list[int], k: int) -> Probe:
    probs = torch.nn.functional.one_hot(torch.tensor(pred), k).float()
    return Probe(x=torch.zeros(len(pred), 3, 2, 2), zero_shot_probs=probs, images=[])


K = 10
BALANCED = [i % K for i in range(100)]


def _entry(
    student: list[int], teacher: list[int] | None = None, zero_shot: list[int] = BALANCED
) -> dict[str, Any]:
    """A health entry for one-hot predictions (the teacher agrees with the student unless given)."""
    one_hot = torch.nn.functional.one_hot
    return snapshot(
        _probe(zero_shot, K),
        one_hot(torch.tensor(student), K).float(),
        one_hot(torch.tensor(student if teacher is None else teacher), K).float(),
        class_names=[str(i) for i in range(K)],
        conf_threshold=0.5,
        prior_entropy=math.log(K),
        step=1,
    )


def _codes(entry: dict[str, Any], which: str = "student") -> list[str]:
    return [w["code"] for w in health_warnings(entry, K, which)]


def test_rule_on_synthetic_predictions() -> None:
    entry = _entry(BALANCED)
    assert _codes(entry) == [] and entry["agree_zero_shot"] == 1.0
    # a 10:1 imbalanced but non-collapsed prediction, like zero-shot's: not flagged
    imb = [i for i in range(K) for _ in range(10 - i)]
    assert _codes(_entry(imb, zero_shot=imb)) == []
    # 60 % in one class: collapsed
    assert _codes(_entry([0] * 60 + BALANCED[:40])) == ["collapsed"]
    # three classes of ten, balanced among them: entropy ratio log3/log10 = 0.48 -> collapsed
    assert _codes(_entry([i % 3 for i in range(100)])) == ["collapsed"]
    # five of ten: not collapsed (ratio 0.7) but degraded against a balanced zero-shot (drop 0.69 > 0.23)
    assert _codes(_entry([i % 5 for i in range(100)])) == ["degraded"]
    # seven of ten: entropy drop log(10/7) = 0.15·log K -> degraded (the old 0.2·log K missed it)
    seven = [i % 7 for i in range(100)]
    drop = math.log(K) - _entry(seven)["pred_entropy"]
    assert 0.1 * math.log(K) < drop < 0.2 * math.log(K) and _codes(_entry(seven)) == ["degraded"]


def test_a_student_that_leaves_its_teacher_is_diverged() -> None:
    """Balanced, spread predictions (no collapse) that differ from the teacher's on 10 % of the
    images: diverged for the student (below 95 % agreement); 96 % agreement is not."""

    def moved(n: int) -> list[int]:
        return [(t + 1) % K if i < n else t for i, t in enumerate(BALANCED)]

    far = _entry(moved(10), teacher=BALANCED)
    assert far["agree_teacher"] == 0.9 and far["entropy_ratio"] == 1.0
    assert _codes(far) == ["diverged"]
    assert _codes(far, "EMA teacher") == []  # the rule is about the student
    assert _codes(_entry(moved(4), teacher=BALANCED)) == []


def test_em_prior_recovers_an_imbalanced_prior() -> None:
    gen = torch.Generator().manual_seed(0)
    true = torch.tensor([0.5, 0.3, 0.15, 0.05])
    labels = torch.multinomial(true, 4000, replacement=True, generator=gen)
    # a calibrated classifier under a uniform prior: likelihood-like, noisy probabilities
    logits = 2.0 * torch.nn.functional.one_hot(labels, 4).float() + torch.randn(
        4000, 4, generator=gen
    )
    est = estimate_prior(logits.softmax(-1))
    assert torch.allclose(est, true, atol=0.05), est
