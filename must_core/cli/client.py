"""REST client commands: ``must jobs …``, ``must models …``, ``must classify …``.

The server URL and API key come from ``--url``/``--api-key`` or ``MUST_URL``/``MUST_API_KEY``.
Output is a table by default or JSON with ``--json``. Exit codes: 0 ok, 1 job failed/cancelled
(``wait``), 2 request refused (problem+json printed), 3 server unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from must_core.cli.engine import parse_overrides
from must_core.client import ClientError, MustClient, Unreachable
from must_core.errors import MustError

__all__ = ["Client", "ClientError", "Unreachable"]

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"succeeded", "failed", "cancelled"}


# The CLI's transport is the public client; re-exported for older imports.
Client = MustClient


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=os.environ.get("MUST_URL", DEFAULT_URL), help="server URL (env MUST_URL)"
    )
    common.add_argument(
        "--api-key", default=os.environ.get("MUST_API_KEY"), help="API key (env MUST_API_KEY)"
    )
    common.add_argument("--json", action="store_true", help="print JSON")

    jobs = sub.add_parser("jobs", help="submit and follow adaptation jobs on a server")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    s = jsub.add_parser("submit", parents=[common], help="submit an adaptation job")
    s.add_argument("dataset_uri", help="s3://bucket/prefix/, file:///path or https://…/data.zip")
    cls = s.add_mutually_exclusive_group(required=True)
    cls.add_argument("--classes", type=Path, help="file with one class name per line")
    cls.add_argument("--class-names", help="comma-separated class names")
    s.add_argument("--templates", type=Path, help="file with one prompt template per line")
    s.add_argument("--model", default="ViT-B-16", help="open_clip architecture")
    s.add_argument("--pretrained", default=None, help="open_clip pretrained tag")
    s.add_argument("--config-uri", default=None, help="custom open_clip config JSON URI")
    s.add_argument("--checkpoint-uri", default=None, help="base checkpoint URI")
    s.add_argument(
        "--allow-random-init", action="store_true", help="allow a base model without weights"
    )
    s.add_argument("--eval-uri", default=None, help="labelled eval dataset URI")
    s.add_argument("--preset", default=None)
    s.add_argument("--epochs", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--wait", action="store_true", help="wait for the job with a progress bar")
    s.set_defaults(func=cmd_submit)
    for name, helptext, fn in (
        ("status", "show a job", cmd_status),
        ("cancel", "cancel a job", cmd_cancel),
    ):
        p = jsub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("job_id")
        p.set_defaults(func=fn)
    w = jsub.add_parser("wait", parents=[common], help="follow a job until it ends")
    w.add_argument("job_id")
    w.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    w.add_argument("--interval", type=float, default=2.0, help="poll period in seconds")
    w.set_defaults(func=cmd_wait)
    ls = jsub.add_parser("list", parents=[common], help="list jobs")
    ls.add_argument(
        "--status", default=None, choices=["queued", "running", "succeeded", "failed", "cancelled"]
    )
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--offset", type=int, default=0)
    ls.set_defaults(func=cmd_jobs_list)

    models = sub.add_parser("models", help="list, show and delete adapted models")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    ml = msub.add_parser("list", parents=[common], help="list adapted models")
    ml.add_argument("--limit", type=int, default=20)
    ml.add_argument("--offset", type=int, default=0)
    ml.set_defaults(func=cmd_models_list)
    for name, helptext, fn in (
        ("show", "show a model", cmd_models_show),
        ("delete", "delete a model", cmd_models_delete),
    ):
        p = msub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("model_id")
        p.set_defaults(func=fn)

    c = sub.add_parser("classify", parents=[common], help="classify images with an adapted model")
    c.add_argument("model_id")
    c.add_argument("images", type=Path, nargs="+")
    c.add_argument("--top-k", type=int, default=5)
    c.set_defaults(func=cmd_classify)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, args.api_key)


def _run(args: argparse.Namespace, fn: Any) -> int:
    try:
        return int(fn(_client(args)))
    except Unreachable as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 3
    except MustError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return 2


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def _job_line(job: dict[str, Any]) -> list[str]:
    prog = job.get("progress") or {}
    frac = prog.get("fraction") or 0.0
    return [
        str(job["id"]),
        job["status"],
        f"{100 * frac:.0f}%",
        f"{prog.get('step', 0)}/{prog.get('total_steps') or '?'}",
        str(job.get("model_id") or ""),
        str((job.get("error") or {}).get("code", "")),
    ]


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(job)
        return
    print(_table([_job_line(job)], ["id", "status", "done", "step", "model_id", "error"]))
    if job.get("error"):
        print(f"error: {job['error']['code']}: {job['error']['message']}")
    ev = (job.get("metrics") or {}).get("eval") or {}
    for name in ("zero_shot", "adapted", "adapted_ema"):
        if name in ev:
            print(
                f"{name:<12} top-1 {ev[name]['top1']:.2f}%  mean/class "
                f"{ev[name]['mean_per_class']:.2f}%"
            )


def cmd_submit(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        if args.classes:
            classes = [x.strip() for x in args.classes.read_text().splitlines() if x.strip()]
        else:
            classes = [x.strip() for x in args.class_names.split(",") if x.strip()]
        params = parse_overrides(args.overrides)
        for key, val in (
            ("preset", args.preset),
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
        ):
            if val is not None:
                params[key] = val
        body: dict[str, Any] = {
            "dataset_uri": args.dataset_uri,
            "class_names": classes,
            "base_model": {
                k: v
                for k, v in (
                    ("arch", args.model),
                    ("pretrained", args.pretrained),
                    ("config_uri", args.config_uri),
                    ("checkpoint_uri", args.checkpoint_uri),
                    ("allow_random_init", args.allow_random_init),
                )
                if v
            },
            "params": params,
        }
        if args.templates:
            body["templates"] = [
                x.strip() for x in args.templates.read_text().splitlines() if x.strip()
            ]
        if args.eval_uri:
            body["eval_dataset_uri"] = args.eval_uri
        job = c.request("POST", "/v1/jobs", json=body)
        if args.wait:
            if not args.json:
                print(f"submitted {job['id']}")
            return _wait(c, str(job["id"]), None, 2.0, args.json)
        _show_job(job, args.json)
        return 0

    return _run(args, go)


def _show(c: Client, method: str, path: str, as_json: bool) -> int:
    _show_job(c.request(method, path), as_json)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _run(args, lambda c: _show(c, "GET", f"/v1/jobs/{args.job_id}", args.json))


def cmd_cancel(args: argparse.Namespace) -> int:
    return _run(args, lambda c: _show(c, "POST", f"/v1/jobs/{args.job_id}/cancel", args.json))


def _wait(c: Client, job_id: str, timeout: float | None, interval: float, as_json: bool) -> int:
    from tqdm import tqdm

    deadline = None if timeout is None else time.monotonic() + timeout
    bar: Any = None
    try:
        while True:
            job = c.request("GET", f"/v1/jobs/{job_id}")
            prog = job.get("progress") or {}
            total = prog.get("total_steps")
            if not as_json and total:
                if bar is None:
                    # ETA comes from the server (its own rate), not tqdm's polling-based estimate.
                    bar = tqdm(
                        total=total,
                        unit="step",
                        file=sys.stderr,
                        dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                    )
                bar.n = prog.get("step", 0)
                eta = prog.get("eta_seconds")
                bar.set_postfix(
                    status=job["status"],
                    eta=f"{eta:.0f}s" if eta is not None else "?",
                    refresh=False,
                )
                bar.refresh()
            if job["status"] in TERMINAL:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(
                    f"job {job_id} still {job['status']} after {timeout}s", code="wait_timeout"
                )
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()
    _show_job(job, as_json)
    return 0 if job["status"] == "succeeded" else 1


def cmd_wait(args: argparse.Namespace) -> int:
    return _run(args, lambda c: _wait(c, args.job_id, args.timeout, args.interval, args.json))


def cmd_jobs_list(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
        if args.status:
            params["status"] = args.status
        page = c.request("GET", "/v1/jobs", params=params)
        if args.json:
            _print_json(page)
        else:
            print(
                _table(
                    [_job_line(j) for j in page["items"]],
                    ["id", "status", "done", "step", "model_id", "error"],
                )
            )
            print(f"{len(page['items'])} of {page['total']}")
        return 0

    return _run(args, go)


def _model_line(m: dict[str, Any]) -> list[str]:
    adapted = (m.get("metrics") or {}).get("adapted") or {}
    top1 = f"{adapted['top1']:.2f}" if "top1" in adapted else ""
    return [
        str(m["id"]),
        str(len(m["class_names"])),
        str(m["base_model"].get("arch", "")),
        f"{m['size_bytes'] / 2**20:.1f} MiB",
        top1,
        str(m["created_at"])[:19],
    ]


def cmd_models_list(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        page = c.request("GET", "/v1/models", params={"limit": args.limit, "offset": args.offset})
        if args.json:
            _print_json(page)
        else:
            print(
                _table(
                    [_model_line(m) for m in page["items"]],
                    ["id", "classes", "base", "size", "top-1", "created"],
                )
            )
        return 0

    return _run(args, go)


def cmd_models_show(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        m = c.request("GET", f"/v1/models/{args.model_id}")
        if args.json:
            _print_json(m)
        else:
            print(_table([_model_line(m)], ["id", "classes", "base", "size", "top-1", "created"]))
            print("classes: " + ", ".join(m["class_names"]))
        return 0

    return _run(args, go)


def cmd_models_delete(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        c.request("DELETE", f"/v1/models/{args.model_id}")
        if not args.json:
            print(f"deleted {args.model_id}")
        return 0

    return _run(args, go)


def cmd_classify(args: argparse.Namespace) -> int:
    def go(c: Client) -> int:
        files = []
        for p in args.images:
            try:
                files.append(("images", (p.name, p.read_bytes(), "application/octet-stream")))
            except OSError as exc:
                raise ClientError(f"cannot read {p}: {exc}", code="file_unreadable") from exc
        res = c.request(
            "POST",
            f"/v1/models/{args.model_id}/classify",
            files=files,
            data={"top_k": str(args.top_k)},
        )
        if args.json:
            _print_json(res)
            return 0
        for p, r in zip(args.images, res["results"], strict=True):
            tops = ", ".join(f"{t['label']} {t['score']:.3f}" for t in r["top_k"])
            print(f"{p}: {tops}")
        return 0

    return _run(args, go)
