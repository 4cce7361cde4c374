"""Shared fixtures: a tiny random-weight open_clip model and generated images (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests run beside other torch processes (a live worker, a server): keep each to its share of cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ASSETS = Path(__file__).parent / "assets"
TINY_CONFIG = ASSETS / "tiny_clip.json"
TINY_ARCH = "must-tiny"


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("MUST_TEST_THREADS", "1")))


@pytest.fixture
def tiny_spec():  # type: ignore[no-untyped-def]
    from must_core.ml.config import BaseModelSpec

    return BaseModelSpec(arch=TINY_ARCH, config=str(TINY_CONFIG), allow_random_init=True)


def write_images(
    folder: Path,
    n: int,
    *,
    seed: int = 0,
    size: tuple[int, int] = (40, 48),
    fmt: str = "png",
    colour: tuple[int, int, int] | None = None,
) -> list[Path]:
    """n random (or tinted) RGB images in folder."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        arr = rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)
        if colour is not None:
            arr = (0.3 * arr + 0.7 * np.array(colour)).astype(np.uint8)
        p = folder / f"img_{seed}_{i}.{fmt}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def make_labelled(root: Path, classes: list[str], per_class: int, seed: int = 0) -> Path:
    colours = [(220, 30, 30), (30, 200, 40), (40, 40, 230), (230, 230, 30), (200, 40, 200)]
    for k, name in enumerate(classes):
        write_images(root / name, per_class, seed=seed + k, colour=colours[k % len(colours)])
    return root


def save_local_dir(clip: object, folder: Path) -> Path:
    """Write an open_clip ``local-dir:`` folder (tiny config + these weights) for fixed-weight tests."""
    import json

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(TINY_CONFIG.read_text())
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {}})
    )
    state = clip.state_dict()  # type: ignore[attr-defined]
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors")
    )
    return folder
