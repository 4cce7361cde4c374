"""Fast checks of the shift benchmark's data generator, augmentation and report (no training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

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


def test_erase_blocks_flattens_whole_blocks_to_the_image_mean() -> None:
    from benchmarks.shift.pretrain import erase_blocks

    x = torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    y = erase_blocks(x, torch.Generator().manual_seed(0), p=1.0)
    changed = (y != x).any(1)  # [B, H, W]
    assert changed.any()
    for b in range(8):
        blocks = changed[b].reshape(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(16, -1)
        # every 16 px block is erased as a whole or not at all, 10-40 % of blocks at most 16
        assert all(bool(r.all()) or not bool(r.any()) for r in blocks)
        mean = x[b].mean(dim=(1, 2))
        assert torch.allclose(y[b][:, changed[b]], mean[:, None].expand(3, int(changed[b].sum())))
    assert torch.equal(erase_blocks(x, torch.Generator().manual_seed(0), p=0.0), x)


def test_target_style_is_part_of_the_data_stamp(tmp_path: Path) -> None:
    from benchmarks.shift.data import TargetStyle, style_key

    assert style_key() == style_key(TargetStyle())
    assert style_key(TargetStyle(hatch_p=0.1)) != style_key()
    write_target(tmp_path, n_adapt=10, n_val=10, n_test=10, seed=1)
    first = (tmp_path / ".complete").read_text()
    write_target(tmp_path, n_adapt=10, n_val=10, n_test=10, seed=1, style=TargetStyle(hatch_p=0.1))
    assert (tmp_path / ".complete").read_text() != first


def test_diagnostics_helpers() -> None:
    from benchmarks.shift.diagnose import knn, linear_probe, parse_run, prior_corrected

    assert parse_run("default=") == ("default", {})
    assert parse_run("x=lr=1e-4;strong_crop_scale=[0.8, 1.0];device=cpu") == (
        "x",
        {"lr": 1e-4, "strong_crop_scale": [0.8, 1.0], "device": "cpu"},
    )
    # A constant bias towards class 0 is removed without labels.
    g = torch.Generator().manual_seed(0)
    y = torch.arange(10).repeat(30)
    logits = torch.nn.functional.one_hot(y, 10).float() * 3 + torch.randn(300, 10, generator=g)
    logits[:, 0] += 4
    assert (logits.argmax(-1) == y).float().mean() < 0.5
    fixed = prior_corrected(logits).argmax(-1)
    assert (fixed == y).float().mean() > 0.8
    # Well-separated clusters: both labelled references are perfect.
    centres = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=-1)
    feats = torch.nn.functional.normalize(
        centres[y] + 0.05 * torch.randn(300, 16, generator=g), dim=-1
    )
    assert knn(feats, y) == 100.0
    assert linear_probe(feats, y) == 100.0


def test_suite_domains_and_data(tmp_path: Path) -> None:
    import dataclasses

    from benchmarks.shift.suite import (
        DOMAINS,
        PLACE_CLASSES,
        VARIANTS,
        WHERE_CLASSES,
        write_domain,
    )
    from must_core.ml.config import make_config

    assert len(WHERE_CLASSES) == 80 and DOMAINS["where80"].flip_changes_class
    assert DOMAINS["shapes10_imbalanced"].imbalance_ratio == 10.0
    for overrides in VARIANTS.values():
        make_config(**overrides)  # every variant is a valid config
    small = dataclasses.replace(DOMAINS["shapes10_imbalanced"], n_adapt=20, n_val=110, n_test=30)
    splits = write_domain(tmp_path / "imb", small)
    counts = sorted(len(list(d.iterdir())) for d in splits["val"].iterdir())
    assert counts[-1] / counts[0] >= 8  # about 10:1 between the most and least frequent class
    assert abs(len(list(splits["adapt"].iterdir())) - 20) <= 1  # flat, unlabeled (rounded counts)
    where = dataclasses.replace(DOMAINS["where80"], n_adapt=4, n_val=40, n_test=4)
    splits = write_domain(tmp_path / "where", where)
    names = {d.name for d in splits["val"].iterdir()}
    assert names <= set(WHERE_CLASSES) and any("left" in n for n in names)
    place = dataclasses.replace(DOMAINS["place40"], n_adapt=4, n_val=40, n_test=4)
    names = {d.name for d in write_domain(tmp_path / "place", place)["val"].iterdir()}
    assert names <= set(PLACE_CLASSES) and any("bottom right" in n for n in names)

    def roughness(folder: Path) -> float:  # mean |difference| between horizontal neighbours
        imgs = [np.asarray(Image.open(f), np.float32) for f in sorted(folder.rglob("*.png"))]
        return float(np.mean([np.abs(np.diff(a, axis=1)).mean() for a in imgs]))

    small = dataclasses.replace(DOMAINS["shapes10_small"], n_adapt=4, n_val=20, n_test=4)
    sharp = dataclasses.replace(small, name="sharp", low_res=0)
    blurred = write_domain(tmp_path / "small", small)["val"]
    assert Image.open(next(blurred.rglob("*.png"))).size == (64, 64)
    assert roughness(blurred) < 0.6 * roughness(write_domain(tmp_path / "sharp", sharp)["val"])


def test_side_layout_names_the_side_a_flip_swaps(tmp_path: Path) -> None:
    import dataclasses

    from benchmarks.shift.data import LAYOUTS, RENDER
    from benchmarks.shift.suite import DOMAINS, MODELS, SIDE_CLASSES, write_domain

    place = LAYOUTS["side"][0]
    rng = np.random.default_rng(0)
    for _ in range(200):  # the class's side word says which half holds the whole shape's centre
        cx, _, r, _, _, side = place(rng)
        assert (cx < 0.4 * RENDER) if side == "left" else (cx > 0.6 * RENDER)
        assert r * 1.15 < min(cx, RENDER - cx)  # the shape stays inside the image
    pairs = list(source_pairs(40, seed=5, layout="side")) + list(
        source_pairs(40, seed=5, clean=True, layout="side")
    )
    assert all(" on the left" in c or " on the right" in c for _, c, _ in pairs)
    d = DOMAINS["side20_small"]
    assert len(SIDE_CLASSES) == 20 and d.flip_changes_class and d.model in MODELS
    names = {
        f.name
        for f in write_domain(
            tmp_path / "side", dataclasses.replace(d, n_adapt=4, n_val=40, n_test=4)
        )["val"].iterdir()
    }
    assert names <= set(SIDE_CLASSES) and {n.split()[-1] for n in names} == {"left", "right"}


def test_suite_markdown_is_spliced_from_the_results() -> None:
    from benchmarks.shift.suite import HEADING, markdown, splice

    run = {
        "seeds": [0],
        "steps": 400,
        "top1_per_seed": [61.5],
        "top1_mean": 61.5,
        "mean_per_class_mean": 60.0,
        "ema_top1_per_seed": [61.0],
        "val_top1_per_seed": [60.5],
        "served_per_seed": ["student"],
        "warnings_per_seed": [[]],
        "augmentation": {
            "flip_agreement": 0.4,
            "shift_agreement": 0.9,
            "hflip": 0.0,
            "crop_agreement": 0.95,
            "crop_scale": [0.8, 1.0],
            "randaug_agreement": 0.55,
            "randaug_magnitude": 7.0,
            "randaug_num_ops": 2,
            "fine_detail": 0.03,
        },
    }
    result = {
        "benchmarks": {
            "where80": {
                "num_classes": 80,
                "imbalance_ratio": 1.0,
                "flip_changes_class": True,
                "zero_shot": {"top1": 40.0, "mean_per_class": 39.0, "val_top1": 41.0},
                "runs": {"must_default": run},
            }
        },
        "wall_seconds": 12.0,
        "full_suite": {
            "command": "python -m benchmarks.shift.suite",
            "wall_seconds": 2100.0,
            "runs": 72,
            "runs_reused": 0,
        },
    }
    md = markdown(result)
    assert "| must_default | [0] | 400 | 61.50 |" in md and "+21.50" in md and "flip p = 0.0" in md
    assert "fine detail 0.0300; RandAugment agreement 0.550 → magnitude 7 (2 ops)" in md
    assert "72 runs, 0 of them reused from the run cache): 2100 s" in md
    run["augmentation"] |= {"fine_detail": 0.003, "randaug_num_ops": 0, "randaug_magnitude": 0.0}
    assert "fine detail 0.0030 → low-detail images, no RandAugment." in markdown(result)
    doc = "# Benchmarks\n\n## Other\nkept\n"
    once = splice(doc, md)
    assert "## Other\nkept" in once and HEADING in once
    assert splice(once, md.replace("61.50", "62.00")).count(HEADING) == 1
