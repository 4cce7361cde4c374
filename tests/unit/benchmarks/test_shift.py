"""Fast checks of the shift benchmark's data generator, augmentation and report (no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from benchmarks.shift.data import CLASSES, IMAGE_SIZE, render_target, source_pairs, write_target
from benchmarks.shift.pretrain import MODEL_CFG, augment, fingerprint
from benchmarks.shift.run import VARIANTS, summarise


def test_source_pairs_are_seeded_and_captioned() -> None:
    a = list(source_pairs(20, seed=3))
    b = list(source_pairs(20, seed=3))
    assert [c for _, c, _ in a] == [c for _, c, _ in b]
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for (x, _, _), (y, _, _) in zip(a, b, strict=True)
    )
    for img, caption, label in a + list(source_pairs(20, seed=3, clean=True)):
        assert img.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert CLASSES[label] in caption
    assert sorted(label for _, _, label in a) == sorted(list(range(10)) * 2)


def test_target_splits_are_balanced_and_labelled(tmp_path: Path) -> None:
    splits = write_target(tmp_path, n_adapt=20, n_val=10, n_test=30, seed=1)
    assert len(list(splits.adapt_dir.glob("*.png"))) == 20
    assert sorted(d.name for d in splits.test_dir.iterdir()) == sorted(CLASSES)
    assert all(len(list(d.glob("*.png"))) == 3 for d in splits.test_dir.iterdir())
    img = render_target(np.random.default_rng(0), 0)
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE)
    y1 = augment(x, torch.Generator().manual_seed(0))
    y2 = augment(x, torch.Generator().manual_seed(0))
    assert y1.shape == x.shape
    assert torch.equal(y1, y2)
    assert MODEL_CFG["vision_cfg"]["image_size"] == IMAGE_SIZE
    assert fingerprint(0) != fingerprint(1)


def test_ablations_only_switch_terms_off_and_summary_schema() -> None:
    allowed = {"mim_weight", "align_weight", "fair_weight", "mask_ratio"}
    assert set(VARIANTS) == {
        "must",
        "no_mim",
        "no_align",
        "no_fair",
        "no_mask",
        "self_training_only",
    }
    assert VARIANTS["must"] == {}
    assert all(set(v) <= allowed and all(x == 0 for x in v.values()) for v in VARIANTS.values())
    runs = [
        {
            "seed": s,
            "top1": 10.0 + s,
            "mean_per_class": 9.0,
            "ema_top1": 8.0,
            "ema_mean_per_class": 7.0,
            "steps": 5,
            "seconds": 1.0,
            "history": [],
            "curve": [],
            "config": {},
        }
        for s in range(3)
    ]
    out = summarise(runs)
    assert out["top1_mean"] == 11.0
    assert out["top1_std"] == 1.0
    assert {"ema_top1_mean", "mean_per_class_mean", "ema_mean_per_class_std"} <= set(out)
    assert len(out["per_seed"]) == 3


def test_markdown_splice_keeps_other_sections() -> None:
    from benchmarks.shift.report import _HEADING, _splice

    existing = f"# Benchmarks\n\n{_HEADING} (x)\n\nold\n\n## Other\n\nkeep me\n"
    generated = f"# Benchmarks\n\n{_HEADING} (x)\n\nnew\n"
    out = _splice(existing, generated)
    assert "new" in out
    assert "old" not in out
    assert out.endswith("## Other\n\nkeep me\n")
    assert _splice("", generated) == generated
    assert _splice("# B\n\n## Other\n", generated).startswith("# B\n\n## Other\n\n" + _HEADING)


def test_plots_are_written_from_run_results(tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks.shift.report import write_plots

    def run(seed: int) -> dict[str, object]:
        history = [
            {
                "step": s,
                "conf_ratio": 0.9,
                "loss": 1.0,
                "st": 0.5,
                "fair": 2.3,
                "mim": 1.0,
                "align": 0.1,
            }
            for s in (10, 20)
        ]
        curve = [{"step": 0, "top1": 50.0, "ema_top1": 50.0}] if seed == 0 else []
        return {"seed": seed, "top1": 52.0 + seed, "mean_per_class": 52.0, "ema_top1": 51.0,
                "ema_mean_per_class": 51.0, "steps": 20, "seconds": 1.0, "history": history,
                "curve": curve, "config": {}}  # fmt: skip

    raw = {"must": [run(0), run(1)], "no_mask": [run(0), run(1)]}
    result = {"zero_shot": {"top1": 50.0}, "runs": {n: summarise(rs) for n, rs in raw.items()}}
    paths = write_plots(raw, result, tmp_path)  # type: ignore[arg-type]
    assert [p.name for p in paths] == ["shift_accuracy.png", "shift_losses.png", "shift_final.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and min(im.size) > 100
