"""Cost of one full MUST step against the floor of the same ViT.

MUST step  = teacher forward (inference mode) + masked student forward/backward + AdamW + EMA update.
Floor      = plain forward (inference mode) + plain training step (forward, CE, backward, AdamW).
Both use the same model, batch, optimizer groups and precision; data loading is excluded. The two are
timed interleaved (floor, MUST, floor, MUST, ...) so that load from other processes hits both alike.

    python -m benchmarks.train_step                       # CPU: tiny config (batch 32) + ViT-B-16 (batch 8)
    python -m benchmarks.train_step --configs vit-b-16 --batch 64 --device cuda   # GPU, bf16

Prints a table and writes JSON (default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

from must_core.ml.ema import EmaUpdater, make_teacher
from must_core.ml.losses import LossWeights
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import MustModel, build_visual_from_cfg, default_mask_patch_size
from must_core.ml.optim import build_optimizer
from must_core.ml.train import must_step_losses

TINY = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 6, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 3},
}
CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "tiny": (TINY, 32),
    "vit-b-16": (open_clip.get_model_config("ViT-B-16"), 8),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def default_optimizer(model: MustModel, *, fused: bool) -> torch.optim.Optimizer:
    """The engine's AdamW groups at the reference's defaults (shared by the step benchmarks)."""
    return build_optimizer(
        model,
        model.num_layers,
        weight_decay=0.05,
        layer_decay=0.65,
        betas=(0.9, 0.999),
        eps=1e-8,
        fused=fused,
    )


def bench(
    name: str, batch: int, device: torch.device, steps: int, warmup: int, amp: bool, classes: int
) -> dict[str, Any]:
    model_cfg, default_batch = CONFIGS[name]
    batch = batch or default_batch
    torch.manual_seed(0)
    visual = build_visual_from_cfg(model_cfg)
    d = int(model_cfg["embed_dim"])
    student = MustModel(visual, F.normalize(torch.randn(d, classes), dim=0)).to(device).train()
    teacher = make_teacher(student)
    ema = EmaUpdater(teacher, student)
    opt = default_optimizer(student, fused=device.type == "cuda")
    for g in opt.param_groups:
        g["lr"] = 1e-5 * g["lr_scale"]
    size, p = student.image_size, student.patch_size
    gen = MaskGenerator(size, default_mask_patch_size(size, p), p, 0.1)
    rng = __import__("numpy").random.default_rng(0)
    mask = torch.stack([torch.from_numpy(gen(rng)) for _ in range(batch)]).to(device)
    weak = torch.randn(batch, 3, size, size, device=device)
    strong = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    weights = LossWeights(fair=1.0, mim=1.0, align=0.2)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if amp
        else torch.autocast(device_type=device.type, enabled=False)
    )

    def floor_step() -> None:
        with torch.inference_mode(), autocast:
            teacher(weak)
        with autocast:
            logits = student(strong)
            assert isinstance(logits, torch.Tensor)
            loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()

    def must_step() -> None:
        with autocast:
            loss, _, _ = must_step_losses(
                student,
                teacher,
                weak,
                strong,
                mask,
                conf_threshold=0.5,
                weights=weights,
                moving_average_fairness=False,
                fair_state=None,
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        ema.update(0.999)

    results: dict[str, list[float]] = {"floor": [], "must": []}
    peaks: dict[str, float] = {}
    for fn_name, fn in (("floor", floor_step), ("must", must_step)):
        for _ in range(warmup):
            fn()
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            fn()
            _sync(device)
            peaks[fn_name] = torch.cuda.max_memory_allocated() / 2**20
    rss_before = _rss_mb()
    for _ in range(steps):
        for fn_name, fn in (("floor", floor_step), ("must", must_step)):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            results[fn_name].append(time.perf_counter() - t0)
    row: dict[str, Any] = {
        "config": name,
        "batch": batch,
        "device": str(device),
        "precision": "bf16" if amp else "fp32",
        "threads": torch.get_num_threads(),
        "steps": steps,
        "params": sum(p.numel() for p in student.parameters()),
    }
    for k, ts in results.items():
        med = statistics.median(ts)
        row[f"{k}_step_s"] = med
        row[f"{k}_images_per_s"] = batch / med
    row["ratio_must_over_floor"] = row["must_step_s"] / row["floor_step_s"]
    if peaks:
        row["floor_peak_mem_mb"] = peaks["floor"]
        row["must_peak_mem_mb"] = peaks["must"]
    else:
        row["process_peak_rss_mb"] = max(rss_before, _rss_mb())
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["tiny", "vit-b-16"], choices=sorted(CONFIGS))
    ap.add_argument("--batch", type=int, default=0, help="0: per-config default (32 tiny, 8 B/16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=0, help="measured steps (0: 10 tiny, 3 B/16 CPU)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    rows = []
    for name in args.configs:
        steps = args.steps or (10 if name == "tiny" or device.type == "cuda" else 3)
        row = bench(name, args.batch, device, steps, args.warmup, amp, args.classes)
        rows.append(row)
        mem = (
            f"peak {row['floor_peak_mem_mb']:.0f}/{row['must_peak_mem_mb']:.0f} MiB"
            if "must_peak_mem_mb" in row
            else f"peak RSS {row['process_peak_rss_mb']:.0f} MiB"
        )
        print(
            f"{name:<9} b={row['batch']:<3} {row['precision']}  floor {row['floor_images_per_s']:8.2f} img/s"
            f"  MUST {row['must_images_per_s']:8.2f} img/s  ratio {row['ratio_must_over_floor']:.3f}  {mem}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
