"""The self-adaptive per-class confidence threshold (conf_threshold_mode="adaptive")."""

from __future__ import annotations

from pathlib import Path

import torch

from must_core.ml.checkpoint import load_training_checkpoint
from must_core.ml.config import make_config
from must_core.ml.distributed import DistContext
from must_core.ml.step import AdaptiveThreshold
from must_core.ml.train import adapt
from tests.conftest import write_images


def _batch(rare_conf: float) -> torch.Tensor:
    """Teacher probabilities over 3 classes: nine images of class 0 at 0.9, one of class 2."""
    frequent = torch.tensor([[0.9, 0.05, 0.05]]).repeat(9, 1)
    rare = torch.tensor([[(1 - rare_conf) / 2, (1 - rare_conf) / 2, rare_conf]])
    return torch.cat([frequent, rare])


def test_starts_low_and_rises_with_the_teachers_confidence() -> None:
    thr = AdaptiveThreshold.start(3, momentum=0.9, device=torch.device("cpu"))
    first = thr.update([_batch(0.6)], DistContext())
    assert torch.all(first < 0.5)  # near 1/K at the start: almost every pseudo-label is used
    for _ in range(200):
        last = thr.update([_batch(0.6)], DistContext())
    assert abs(float(thr.state[0]) - 0.87) < 1e-3  # the mean max-probability (9·0.9 + 0.6) / 10
    assert abs(float(last[0]) - 0.87) < 1e-3  # the most predicted class gets τ itself
    # a class the teacher rarely predicts gets a lower threshold: its 0.6 passes, which the
    # frequent class's threshold (and a fixed 0.7) would refuse
    assert float(last[2]) < 0.6 < float(last[0])


def test_adaptive_threshold_trains_and_its_state_is_checkpointed(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "d"
    write_images(data, 24, seed=5)
    cfg = make_config(
        batch_size=8,
        epochs=2,
        conf_threshold_mode="adaptive",
        adaptive_threshold_momentum=0.5,
    )
    res = adapt(
        cfg,
        images_dir=data,
        class_names=["red", "green", "blue"],
        output_dir=tmp_path / "out",
        base_model=tiny_spec,
    )
    assert res.status == "completed"
    state = load_training_checkpoint(res.checkpoint_path)["threshold_state"]
    assert state.shape == (4,) and torch.isfinite(state).all()
    assert not torch.allclose(state, torch.full((4,), 1 / 3))  # it moved with the teacher
