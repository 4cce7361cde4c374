"""CUDA path: bf16 autocast training and fp32 export. Skipped on machines without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from must_core.ml.config import make_config
from must_core.ml.train import adapt
from tests.conftest import write_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_adapt_on_cuda_bf16(tmp_path: Path, tiny_spec) -> None:  # type: ignore[no-untyped-def]
    write_images(tmp_path / "d", 16)
    events = []
    res = adapt(
        make_config(batch_size=8, epochs=2, progress_every_steps=1, device="cuda"),
        images_dir=tmp_path / "d",
        class_names=["a", "b", "c"],
        output_dir=tmp_path / "o",
        base_model=tiny_spec,
        on_progress=events.append,
    )
    assert res.status == "completed" and res.step == 4
    assert all(torch.isfinite(torch.tensor(list(e.losses.values()))).all() for e in events)
