"""Plots and the markdown table for the shift benchmark."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LABELS = {
    "must": "MUST (full)",
    "no_mim": "w/o MIM loss",
    "no_align": "w/o alignment",
    "no_fair": "w/o fairness",
    "self_training_only": "self-training only",
}
COLOURS = {
    "must": "C0",
    "no_mim": "C1",
    "no_align": "C2",
    "no_fair": "C3",
    "self_training_only": "C4",
}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(
    raw: dict[str, list[dict[str, Any]]], result: dict[str, Any], out: Path
) -> list[Path]:
    plt = _plt()
    paths = []
    zs = result["zero_shot"]["top1"]

    # 1. Test accuracy (student and EMA, first seed) and confident ratio (mean over seeds) vs step.
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in raw.items():
        curve = next((r["curve"] for r in runs if r["curve"]), [])
        if curve:
            steps = [p["step"] for p in curve]
            ax1.plot(steps, [p["top1"] for p in curve], color=COLOURS[name], label=LABELS[name])
            ax1.plot(steps, [p["ema_top1"] for p in curve], color=COLOURS[name], ls="--", alpha=0.6)
        hist = [r["history"] for r in runs]
        n = min(len(h) for h in hist)
        steps = [hist[0][i]["step"] for i in range(n)]
        conf = [sum(h[i]["conf_ratio"] for h in hist) / len(hist) for i in range(n)]
        ax2.plot(steps, conf, color=COLOURS[name], label=LABELS[name])
    ax1.axhline(zs, color="k", ls=":", label=f"zero-shot ({zs:.1f})")
    ax1.set(
        xlabel="step",
        ylabel="target test top-1 (%)",
        title="Accuracy (solid: student, dashed: EMA; seed 0)",
    )
    ax1.legend(fontsize=8)
    ax2.set(
        xlabel="step",
        ylabel="fraction of confident pseudo-labels",
        title="Confident ratio (mean over seeds)",
    )
    ax2.legend(fontsize=8)
    fig.tight_layout()
    p = out / "shift_accuracy.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # 2. Losses vs step (mean over seeds), one panel per loss term.
    keys = ["loss", "st", "fair", "mim", "align"]
    titles = {
        "loss": "total",
        "st": "self-training CE",
        "fair": "fairness",
        "mim": "MIM (L1)",
        "align": "alignment",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(16, 3.4))
    for ax, key in zip(axes, keys, strict=True):
        for name, runs in raw.items():
            hist = [r["history"] for r in runs]
            n = min(len(h) for h in hist)
            steps = [hist[0][i]["step"] for i in range(n)]
            vals = [sum(h[i][key] for h in hist) / len(hist) for i in range(n)]
            ax.plot(steps, vals, color=COLOURS[name], label=LABELS[name])
        ax.set(title=titles[key], xlabel="step")
    axes[0].legend(fontsize=7)
    fig.suptitle("Training losses (unweighted terms, mean over seeds)", fontsize=10)
    fig.tight_layout()
    p = out / "shift_losses.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)

    # 3. Final top-1 per variant with std over seeds.
    fig, ax = plt.subplots(figsize=(8, 3.6))
    names = list(raw)
    runs = result["runs"]
    xs = range(len(names))
    ax.bar(
        [x - 0.2 for x in xs],
        [runs[n]["top1_mean"] for n in names],
        0.4,
        yerr=[runs[n]["top1_std"] for n in names],
        label="student",
        color="C0",
        capsize=3,
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [runs[n]["ema_top1_mean"] for n in names],
        0.4,
        yerr=[runs[n]["ema_top1_std"] for n in names],
        label="EMA teacher",
        color="C9",
        capsize=3,
    )
    ax.axhline(zs, color="k", ls=":", label=f"zero-shot ({zs:.1f})")
    ax.set_xticks(list(xs), [LABELS[n] for n in names], fontsize=8)
    ax.set(ylabel="target test top-1 (%)", title="Final accuracy (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "shift_final.png"
    fig.savefig(p, dpi=80)
    plt.close(fig)
    paths.append(p)
    return paths


def _verdict(result: dict[str, Any]) -> str:
    zs = result["zero_shot"]["top1"]
    must = result["runs"]["must"]
    gain = must["top1_mean"] - zs
    ok = gain >= 10 and all(r["top1"] - zs >= 10 for r in must["per_seed"])
    if ok:
        return (
            f"**Result:** full MUST beats zero-shot by {gain:+.1f} points top-1 on every seed with "
            "the engine's default settings."
        )
    runs = result["runs"]
    best = max(runs.items(), key=lambda kv: kv[1]["top1_mean"])
    text = (
        f"**Result: the acceptance criterion is NOT met.** With the engine's default settings the "
        f"adapted student reaches {must['top1_mean']:.1f} ± {must['top1_std']:.1f} % against "
        f"{zs:.1f} % zero-shot ({gain:+.1f} points); the EMA teacher stays near zero-shot "
        f"({must['ema_top1_mean']:.1f} %). The best variant is `{best[0]}` "
        f"({best[1]['top1_mean']:.1f} %)."
    )
    if all(k in runs for k in VARIANT_KEYS):
        loo = {
            k: runs[k]["top1_mean"] - must["top1_mean"] for k in ("no_mim", "no_align", "no_fair")
        }
        st = runs["self_training_only"]["top1_mean"] - must["top1_mean"]
        text += (
            " Leave-one-out: removing MIM changes top-1 by "
            f"{loo['no_mim']:+.1f}, alignment by {loo['no_align']:+.1f}, fairness by "
            f"{loo['no_fair']:+.1f} points; plain self-training (no mask, MIM, alignment or fairness) "
            f"differs by {st:+.1f} points from full MUST. See the diagnostics below."
        )
    return text


VARIANT_KEYS = ("must", "no_mim", "no_align", "no_fair", "self_training_only")


# Measured once on the labelled target *validation* split (same generator and style as the test
# split, different seed), 1 torch thread, seed 0, 400 steps unless noted. Reproduce with
# ``must_core.ml.train.adapt`` on .cache/shift/data/target/{adapt,val} and the overrides shown.
DIAGNOSTICS = """### Diagnostics: why the default MUST does not help here (validation split only)

All numbers are top-1 on the labelled target **validation** split (never the test split): zero-shot
37.9 %. Each row is one adaptation run of the engine with the overrides shown (seed 0, 400 steps;
the defaults row was re-measured with the merged engine: 31.4 / 36.9).

| overrides | student | EMA | reading |
|---|---|---|---|
| none (defaults) | 31.4 | 36.8 | the student loses 6.5 points |
| `lr=1e-12` (sanity) | 37.9 | 37.9 | no update → exactly zero-shot: no bug outside the optimiser path |
| `mim_weight=0` | 31.3 | 36.9 | MIM is not the cause |
| `mim_weight=0, align_weight=0` (masking kept) | 31.4 | 36.9 | identical to the defaults: MIM and alignment are not the cause |
| `mask_ratio=0` (no masking, so MIM and alignment vanish too) | 38.0 | 38.2 | **masking the student's input costs the 6.5 points**; still no gain |
| `mask_patch_size=4` (single-patch mask blocks instead of 2×2) | 32.3 | 36.8 | finer blocks barely help |
| `mask_ratio=0, fair_weight=0` | 32.6 | 37.6 | without masking, fairness is worth +5.4 points |
| `conf_threshold=0.9` | 27.2 | 36.4 | fewer pseudo-labels → worse: the regularisers alone push the wrong way |
| `ema_batch_scaling=false, lr=1e-4, min_steps=1200` | 28.4 | 35.2 | a faster teacher and 20× lr make it worse, not better |
| `strong_crop_scale=(0.8,1)` | 35.0 | 37.3 | the default crop (0.3–1 of a 32 px image) often cuts the small shapes out: ~3.6 of the 6.5 lost points |
| `randaug_num_ops=0, strong_crop_scale=(1,1)` (MUST without strong augmentation) | 34.8 | 37.6 | still below zero-shot |
| self-distillation: `randaug_num_ops=0, strong_crop_scale=(1,1), mask_ratio=0, mim/align/fair=0` | 36.4 | 37.8 | even plain hard-label self-training slowly loses accuracy |

On a harder target variant (20 % thick outlines, zero-shot 27.1 %) the picture was the same:
defaults 22.6 / 26.9, self-training only 24.2 / 27.2, `ema_batch_scaling=false` 22.1 / 26.1,
`lr=2e-4` 23.2 / 27.6, `randaug_num_ops=0` 25.5 / 27.4 (student / EMA). On the *source* domain of an
earlier tiny CLIP (zero-shot 59.7 %) the default run also fell to 46.3 % (EMA 60.1 %).

Reading: the schedule knobs named in spec §11 (lr scaling with batch, EMA speed, thresholds) are not
what limits this setup: every variant drifts *below* or at best stays at the zero-shot model (most of
the drop happens in the first ~150 steps, while the cosine lr is highest; see the accuracy plot), and
the EMA teacher stays close to zero-shot only because it moves slowly. The single largest cost is
masking the student's input (8 of 64 tokens in 2×2-patch blocks at 32 px): with masking off, MUST
keeps zero-shot accuracy (38.0 %), with it on, MIM and alignment on or off make no difference
(31.3–31.4 %). The aggressive strong crop (30 % of a 32 px image often loses the shape, while the
teacher's label comes from the full image) costs a few more points. What is left is confirmation
bias: with a 38 % zero-shot classifier most confident pseudo-labels are wrong (about 74 % of the
teacher's predictions pass τ = 0.5 at logit scale 100), and this tiny CLIP's features (160 k visual
parameters, trained on synthetic pairs) do not cluster the target classes well enough for
self-training to correct them; the settings where MUST is reported to work start at ≥ 43 % zero-shot
with ViT-B/16 features.

The loss plot adds one observation for the lead: the MIM loss stays flat at ~1.03 (L1 in normalised
pixels) for the whole run; at the default lr (5e-6 at batch 64) the freshly initialised pixel
decoder barely trains in 400 steps, so on small datasets the MIM term mostly feeds gradients from a
near-random decoder into the encoder (removing it changes nothing here).

No default was changed, because no default change was justified by the validation split. (Rows measured before the engine's own posterize fix was merged
used an equivalent benchmark-side work-around; the masking rows, the defaults re-measurement and the
main table above use the merged engine.)
"""


def _pm(r: dict[str, Any], key: str) -> str:
    return f"{r[key + '_mean']:.1f} ± {r[key + '_std']:.1f}"


def write_markdown(result: dict[str, Any], md: Path, out: Path, plots: list[Path]) -> None:
    zs = result["zero_shot"]
    runs = result["runs"]
    wall = result["wall_seconds"]
    cfg = result["engine_config"]
    rel = os.path.relpath(out, md.parent)
    steps = runs["must"]["per_seed"][0]["steps"]
    lines = [
        "# Benchmarks",
        "",
        "## Domain shift: tiny CLIP on procedurally rendered shapes (`benchmarks/shift/`)",
        "",
        "Pretrained CLIP weights cannot be downloaded here, so this benchmark builds a scaled-down but",
        "real experiment that runs offline on 2 CPU cores:",
        "",
        "- **Source / pretraining.** Seeded image–caption pairs (2 × "
        f"{result['pretrain']['settings']['stages'][0]['num_pairs']:,}): one filled shape (10 classes: "
        + ", ".join(result["classes"])
        + ") in a flat colour on a flat background of random colour, "
        'captions from templates ("a small red star in the top left."). A tiny open_clip CLIP '
        f"({result['pretrain']['num_params']:,} parameters; ViT 32 px, patch 4, 3 blocks of width 64) is "
        "trained contrastively on them by the benchmark in two stages (clean icons with a learned "
        "temperature; then colour-varied icons with light affine/contrast/blur/noise augmentation "
        "while the temperature is annealed to the engine's fixed logit scale 100) and cached under "
        "`.cache/shift/`.",
        "- **Target.** The same classes drawn light (solid or hatched) on dark, striped, blotchy "
        "backgrounds with distractor strokes, blur and pixel noise: "
        f"{result['splits']['target_adapt_unlabeled']:,} unlabeled images to adapt on and a labelled "
        f"test set of {result['splits']['target_test']:,} (200 per class), generated with different "
        "seeds. A separate labelled target *validation* split "
        f"({result['splits']['target_val']:,}) exists for checking engine defaults; the test split is "
        "never used for any choice.",
        f"- **Runs.** Zero-shot (prompt ensemble of {len(result['templates'])} templates); full MUST with "
        "the engine's **default config** (`make_config()`); ablations that only switch loss terms off. "
        f"Seeds {', '.join(map(str, result['seeds']))} (adaptation seed: augmentation, masks, order; "
        "data and pretraining are fixed). "
        f"Each run: {steps} steps at batch {cfg['batch_size']} ({cfg['epochs']} epochs), "
        "final student and EMA teacher evaluated on the test split. ± is the sample std over seeds.",
        "",
        f"Zero-shot top-1 of the pretrained tiny CLIP: **{zs['source_top1']:.1f} %** on held-out source "
        f"images, **{zs['top1']:.1f} %** on the target test split (mean per class "
        f"{zs['mean_per_class']:.1f} %).",
        "",
        "| method | overrides | top-1 (student) | mean-per-class (student) | top-1 (EMA) | "
        "mean-per-class (EMA) | Δ top-1 vs zero-shot |",
        "|---|---|---|---|---|---|---|",
        f"| zero-shot | – | {zs['top1']:.1f} | {zs['mean_per_class']:.1f} | – | – | – |",
    ]
    from benchmarks.shift.report import LABELS as labels

    for name, r in runs.items():
        ov = ", ".join(f"`{k}={v:g}`" for k, v in r["overrides"].items()) or "defaults"
        lines.append(
            f"| {labels[name]} | {ov} | {_pm(r, 'top1')} | {_pm(r, 'mean_per_class')} | "
            f"{_pm(r, 'ema_top1')} | {_pm(r, 'ema_mean_per_class')} | "
            f"{r['top1_mean'] - zs['top1']:+.1f} |"
        )
    lines += [
        "",
        "`w/o MIM loss` keeps the masked student input and the alignment loss and drops only the pixel "
        "reconstruction term; `self-training only` also disables masking (`mask_ratio=0`).",
        "",
        f"![accuracy and confident ratio]({rel}/shift_accuracy.png)",
        "",
        f"![losses]({rel}/shift_losses.png)",
        "",
        f"![final accuracy]({rel}/shift_final.png)",
        "",
        "Wall time of the documented run "
        f"({result['threads']} torch threads, {result['machine']}; the 2 cores were shared with other "
        f"jobs, so these are upper bounds): adaptation runs {wall['runs'] / 60:.1f} min, total "
        f"{wall['total'] / 60:.1f} min with the cache "
        f"{'warm' if wall['pretrain_cached'] else 'cold'}; pretraining of the cached model took "
        f"{wall['pretrain_when_not_cached'] / 60:.1f} min (stage 1 on 1 thread, stage 2 under heavy "
        "contention)"
        + (
            f"; a separate cold rerun of the pretraining on 2 threads took "
            f"{wall['pretrain_cold_rerun'] / 60:.1f} min."
            if "pretrain_cold_rerun" in wall
            else "."
        ),
        "",
        "Rerun (from the repository root; regenerates data and the tiny CLIP when `.cache/shift/` is empty):",
        "",
        "```bash",
        "python -m benchmarks.shift.run            # --threads 2 --seeds 0 1 2 by default",
        "```",
        "",
        "Raw numbers, per-seed results and the exact engine config: "
        f"[`{rel}/shift.json`]({rel}/shift.json).",
        "",
        _verdict(result),
        "",
        DIAGNOSTICS,
    ]
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(_splice(md.read_text() if md.exists() else "", "\n".join(lines)))


_HEADING = "## Domain shift: tiny CLIP on procedurally rendered shapes"


def _splice(existing: str, generated: str) -> str:
    """Replace only this benchmark's section of docs/benchmarks.md; other sections are kept."""
    section = generated[generated.index(_HEADING) :].rstrip("\n") + "\n"
    if _HEADING not in existing:
        return generated if not existing.strip() else existing.rstrip("\n") + "\n\n" + section
    start = existing.index(_HEADING)
    nxt = existing.find("\n## ", start + len(_HEADING))
    tail = "" if nxt < 0 else "\n" + existing[nxt + 1 :]
    return existing[:start] + section + tail


def main() -> None:
    """Rewrite docs/benchmarks.md from docs/benchmarks/shift.json (plots are kept as they are)."""
    import json

    out = Path("docs/benchmarks")
    result = json.loads((out / "shift.json").read_text())
    plots = [out / name for name in result.get("plots", [])]
    write_markdown(result, Path("docs/benchmarks.md"), out, plots)


if __name__ == "__main__":
    main()
