"""What the distributed-training paths cost, measured side by side in one run.

1. ``step``: one MUST optimizer step (teacher pass, masked student forward/backward, AdamW, EMA) through
   :class:`must_core.ml.step.GlobalStep`, the loop's own step, at one global batch:
   - 1 process, the whole batch in one pass (the baseline), at 1 and at N threads;
   - N DDP processes (gloo on CPU, NCCL on CUDA) started with torchrun, 1 thread each;
   - 1 process with gradient accumulation (micro-batches of batch/2 and batch/4): the overhead of the
     no-grad marginal pre-pass and the smaller passes.
2. ``checkpoint``: how long the training thread is blocked per checkpoint, before (torch.save and the
   upload copy on the training thread, as the engine did) and after (``AsyncCheckpointer``: a CPU
   snapshot; writing and uploading happen on other threads/processes).

    python -m benchmarks.scale                                  # CPU: tiny model, batch 32, 2 ranks
    python -m benchmarks.scale --model vit-b-16 --device cuda --batch 256 --micro 64   # GPU

Prints a table and writes JSON (default benchmarks/results/scale.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.train_step import CONFIGS, default_optimizer
from must_core.ml.checkpoint import AsyncCheckpointer, save_training_checkpoint
from must_core.ml.distributed import DistContext, batch_layout, from_environment
from must_core.ml.ema import EmaUpdater, make_teacher
from must_core.ml.losses import LossWeights
from must_core.ml.masking import MaskGenerator
from must_core.ml.model import MustModel, build_visual_from_cfg, default_mask_patch_size
from must_core.ml.step import GlobalStep

REPO = Path(__file__).resolve().parents[1]


def _model(name: str, device: torch.device, classes: int) -> MustModel:
    model_cfg, _ = CONFIGS[name]
    torch.manual_seed(0)
    visual = build_visual_from_cfg(model_cfg)
    d = int(model_cfg["embed_dim"])
    return MustModel(visual, F.normalize(torch.randn(d, classes), dim=0)).to(device).train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(args: argparse.Namespace, dist: DistContext, micro: int | None) -> dict[str, Any]:
    """Median step time of GlobalStep for this process's share of the global batch."""
    device = torch.device(args.device)
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    model = _model(args.model, device, args.classes)
    student: torch.nn.Module = model
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        student = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    teacher = make_teacher(model)
    ema = EmaUpdater(teacher, model)
    opt = default_optimizer(model, fused=device.type == "cuda")
    layout = batch_layout(args.batch, dist.world_size, micro)
    amp = device.type == "cuda"
    step = GlobalStep(
        student=student,
        model=model,
        teacher=teacher,
        layout=layout,
        dist=dist,
        conf_threshold=0.5,
        weights=LossWeights(fair=4.0, mim=1.0, align=0.2),
        moving_average_fairness=False,
        autocast=lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp),
    )
    size, p = model.image_size, model.patch_size
    gen = MaskGenerator(size, default_mask_patch_size(size, p), p, 0.1)
    rng = __import__("numpy").random.default_rng(dist.rank)
    b = layout.micro_batch
    micro_batches = [
        (
            torch.randn(b, 3, size, size, device=device),
            torch.randn(b, 3, size, size, device=device),
            torch.stack([torch.from_numpy(gen(rng)) for _ in range(b)]).to(device),
        )
        for _ in range(layout.accum_steps)
    ]

    def one() -> None:
        opt.zero_grad(set_to_none=True)
        step(micro_batches, None)
        opt.step()
        ema.update(0.999)

    for _ in range(args.warmup):
        one()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        one()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    row = {
        "processes": dist.world_size,
        "threads_per_process": torch.get_num_threads(),
        "global_batch": args.batch,
        "micro_batch": b,
        "accum_steps": layout.accum_steps,
        "step_s": med,
        "images_per_s": args.batch / med,
    }
    if device.type == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return row


def _rank_main(args: argparse.Namespace) -> None:
    """One rank under torchrun: time the steps, rank 0 writes the row."""
    import torch.distributed as tdist

    dist = from_environment()
    tdist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    torch.set_num_threads(args.threads)
    row = time_steps(args, dist, args.micro or None)
    if dist.is_main:
        Path(args.rank_out).write_text(json.dumps(row))
    tdist.destroy_process_group()


def _torchrun_row(args: argparse.Namespace, nproc: int, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "benchmarks.scale",
            "--rank-out",
            str(out),
            "--model",
            args.model,
            "--device",
            args.device,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(threads),
            "--classes",
            str(args.classes),
        ]
        if args.micro:
            cmd += ["--micro", str(args.micro)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
        return dict(json.loads(out.read_text()))


def step_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    one = DistContext()
    for threads in sorted({1, args.threads}):
        torch.set_num_threads(threads)
        rows.append({"variant": f"1 process x {threads} thread(s)", **time_steps(args, one, None)})
    torch.set_num_threads(args.threads)
    for div in (2, 4):
        micro = args.batch // div
        row = time_steps(args, one, micro)
        rows.append({"variant": f"1 process, accumulation {div} x {micro}", **row})
    if args.nproc > 1:
        threads = 1 if args.device == "cpu" else args.threads
        row = _torchrun_row(args, args.nproc, threads)
        rows.append({"variant": f"{args.nproc} DDP processes x {threads} thread", **row})
    return rows


def checkpoint_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Training-thread stall per checkpoint: synchronous save + upload copy vs the async path."""
    device = torch.device(args.device)
    model = _model(args.ckpt_model, device, args.classes)
    teacher = make_teacher(model)
    opt = default_optimizer(model, fused=False)
    model(torch.randn(2, 3, model.image_size, model.image_size, device=device)).sum().backward()
    opt.step()  # Adam moments exist, as in a real checkpoint

    def payload() -> dict[str, Any]:
        return {
            "student": model.state_dict(),
            "ema": teacher.state_dict(),
            "optimizer": opt.state_dict(),
            "step": 1,
        }

    rows = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        root = Path(tmp)
        before, after, sizes = [], [], []
        for i in range(args.ckpt_repeats):
            t0 = time.perf_counter()
            save_training_checkpoint(root / "sync.pt", payload())
            shutil.copyfile(root / "sync.pt", root / f"store-{i}.pt")  # the upload, also blocking
            before.append(time.perf_counter() - t0)
            sizes.append((root / "sync.pt").stat().st_size)
            ck = AsyncCheckpointer(root / "async.pt")
            t0 = time.perf_counter()
            ck.save(payload(), 1)
            after.append(time.perf_counter() - t0)
            ck.close()  # the background write finishes off the measured path
            (root / f"store-{i}.pt").unlink()
        rows.append(
            {
                "model": args.ckpt_model,
                "checkpoint_mb": statistics.median(sizes) / 2**20,
                "stall_before_s": statistics.median(before),
                "stall_after_s": statistics.median(after),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(CONFIGS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="global batch per optimizer step")
    ap.add_argument("--micro", type=int, default=0, help="micro-batch for the DDP row (0: none)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ckpt-model", default="vit-b-16", choices=sorted(CONFIGS))
    ap.add_argument("--ckpt-repeats", type=int, default=3)
    ap.add_argument("--scratch", default=None, help="folder for checkpoint files (default: tmp)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["step", "checkpoint"])
    ap.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = ap.parse_args()
    if args.rank_out:
        return _rank_main(args)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device": args.device,
        "model": args.model,
    }
    if "step" not in args.skip:
        report["step"] = step_rows(args)
        base = report["step"][0]["step_s"]
        for row in report["step"]:
            row["time_vs_baseline"] = row["step_s"] / base
            print(
                f"{row['variant']:<38} {row['images_per_s']:9.1f} img/s  x{row['time_vs_baseline']:.2f}"
                + (f"  peak {row['peak_mem_mb']:.0f} MiB" if "peak_mem_mb" in row else "")
            )
    if "checkpoint" not in args.skip:
        report["checkpoint"] = checkpoint_rows(args)
        for row in report["checkpoint"]:
            print(
                f"checkpoint {row['model']} ({row['checkpoint_mb']:.0f} MB): training thread blocked "
                f"{row['stall_before_s']:.2f}s before, {row['stall_after_s']:.2f}s after"
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return None


if __name__ == "__main__":
    main()
