"""One global batch, however it is split: 2 DDP ranks (gloo, through the real launcher and torchrun)
and gradient accumulation give the same step-0 losses and, after several steps, the same weights as one
process taking the whole batch at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from must_core.ml.checkpoint import load_training_checkpoint
from must_core.ml.config import make_config
from must_core.ml.distributed import batch_layout
from must_core.ml.launch import EVENTS_FILE, RESULT_FILE, LaunchSpec
from must_core.ml.train import adapt
from tests.conftest import write_images

CLASSES = ["red", "green", "blue"]
STEPS = 6
REPO = Path(__file__).resolve().parents[3]


def _cfg(**kw: Any) -> Any:
    base = {
        "batch_size": 8,
        "epochs": 3,  # 16 images / 8 = 2 steps per epoch → 6 steps
        "progress_every_steps": 1,
        "checkpoint_every_steps": 100,
        "conf_threshold": 0.3,
        "export_ema": False,
        "num_threads": 1,
        "num_workers": 0,
        "device": "cpu",
    }
    base.update(kw)
    return make_config(**base)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_spec_module: Any) -> dict[str, Any]:
    """One process, the whole batch of 8 per step."""
    root = tmp_path_factory.mktemp("ddp")
    data = root / "d"
    write_images(data, 16, seed=11)
    events: list[Any] = []
    res = adapt(
        _cfg(),
        images_dir=data,
        class_names=CLASSES,
        output_dir=root / "ref",
        base_model=tiny_spec_module,
        on_progress=events.append,
    )
    assert res.status == "completed" and res.step == STEPS
    return {
        "root": root,
        "data": data,
        "losses": [e.losses | {"conf_ratio": e.conf_ratio} for e in events],
        "state": load_training_checkpoint(res.checkpoint_path),
    }


@pytest.fixture(scope="module")
def tiny_spec_module() -> Any:
    from must_core.ml.config import BaseModelSpec
    from tests.conftest import TINY_ARCH, TINY_CONFIG

    return BaseModelSpec(arch=TINY_ARCH, config=str(TINY_CONFIG), allow_random_init=True)


def _launch(run_dir: Path, ref: dict[str, Any], spec: Any, cfg: Any, nproc: int) -> dict[str, Any]:
    LaunchSpec(
        config=cfg.model_dump(mode="json"),
        images_dir=str(ref["data"]),
        class_names=CLASSES,
        output_dir=str(run_dir / "out"),
        base_model=spec.model_dump(),
    ).write(run_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "must_core.ml.launch", str(run_dir), "--torchrun", str(nproc)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / RESULT_FILE).read_text())
    lines = (run_dir / EVENTS_FILE).read_text().splitlines()
    events = [e for e in map(json.loads, lines) if e["type"] == "progress"]
    assert [e["step"] for e in map(json.loads, lines) if e["type"] == "checkpoint"] == [STEPS]
    return {
        "result": result,
        "losses": [e["losses"] | {"conf_ratio": e["conf_ratio"]} for e in events],
        "state": load_training_checkpoint(Path(result["checkpoint_path"])),
    }


def _assert_same_run(ref: dict[str, Any], other: dict[str, Any]) -> None:
    step0, other0 = ref["losses"][0], other["losses"][0]
    assert step0.keys() == other0.keys()
    for k in step0:  # the step-0 loss components, taken over the same global batch
        assert abs(step0[k] - other0[k]) < 1e-5, (k, step0[k], other0[k])
    assert len(other["losses"]) == STEPS
    for key in ("student", "ema"):
        for name, t in ref["state"][key].items():
            # Equal up to float reassociation of gradient sums (split batches, all-reduce order);
            # Adam can turn a reassociated near-zero gradient into a step of up to ~lr, so the bound
            # is a few such steps (lr 1e-4 × 8/256 = 3e-6 here).
            assert torch.allclose(t, other["state"][key][name], rtol=1e-4, atol=5e-5), (key, name)
    assert other["state"]["step"] == STEPS


def test_accumulation_matches_the_full_batch(
    reference: dict[str, Any], tiny_spec_module: Any
) -> None:
    events: list[Any] = []
    res = adapt(
        _cfg(micro_batch_size=4),  # 2 micro-steps of 4 per optimizer step
        images_dir=reference["data"],
        class_names=CLASSES,
        output_dir=reference["root"] / "accum",
        base_model=tiny_spec_module,
        on_progress=events.append,
    )
    other = {
        "losses": [e.losses | {"conf_ratio": e.conf_ratio} for e in events],
        "state": load_training_checkpoint(res.checkpoint_path),
    }
    _assert_same_run(reference, other)


def test_two_ddp_ranks_match_one_process(reference: dict[str, Any], tiny_spec_module: Any) -> None:
    run = _launch(reference["root"] / "ddp", reference, tiny_spec_module, _cfg(), nproc=2)
    _assert_same_run(reference, run)
    assert run["result"]["model_path"] is not None  # rank 0 exported


def test_ddp_with_accumulation_matches_one_process(
    reference: dict[str, Any], tiny_spec_module: Any
) -> None:
    cfg = _cfg(micro_batch_size=2)  # 2 ranks × 2 micro-steps × 2 images
    run = _launch(reference["root"] / "ddp-accum", reference, tiny_spec_module, cfg, nproc=2)
    _assert_same_run(reference, run)


def test_batch_layout_validation() -> None:
    from must_core.errors import InvalidConfigError

    layout = batch_layout(1024, 4, 64)
    assert (layout.per_rank, layout.accum_steps) == (256, 4)
    assert batch_layout(64, 1, None).accum_steps == 1
    with pytest.raises(InvalidConfigError):
        batch_layout(10, 4, None)
    with pytest.raises(InvalidConfigError):
        batch_layout(64, 1, 48)


def test_a_failing_rank_fails_the_run_with_its_error_code(
    tmp_path: Path, tiny_spec_module: Any
) -> None:
    from must_core.errors import MustError
    from worker.training import TrainingProcess

    spec = LaunchSpec(
        config=_cfg().model_dump(mode="json"),
        images_dir=str(tmp_path / "missing"),  # every rank fails while scanning
        class_names=CLASSES,
        output_dir=str(tmp_path / "out"),
        base_model=tiny_spec_module.model_dump(),
    )
    proc = TrainingProcess(tmp_path / "run", spec, nproc=2, threads=1)
    proc.start()
    assert proc.proc is not None
    proc.proc.wait(timeout=120)
    proc.join_output()
    assert proc.poll() != 0
    with pytest.raises(MustError) as err:
        proc.outcome()
    assert err.value.code == "dataset_invalid" and "not found" in err.value.message
