"""The GPU workers of docker-compose.yml: distinct GPUs, shared memory, a persistent weights volume.

Compose cannot give `--scale` replicas distinct GPUs (a `count: 1` reservation hands every replica
GPU 0), so each GPU worker is its own service naming its GPUs in ``device_ids``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.deploy.helpers import (
    DOCKERFILES,
    dockerfile,
    dockerfile_env,
    env_example,
    gpu_devices,
    interpolate,
    parse_bytes,
)

# The variables of an unset environment (compose defaults) and of `cp .env.example .env`.
SETUPS = {"defaults": {}, ".env.example": env_example()}


def _gpu_workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if gpu_devices(s)}


def _device_ids(service: dict[str, Any]) -> list[str]:
    return [str(i) for d in gpu_devices(service) for i in d.get("device_ids", [])]


def test_gpu_workers_reserve_gpus_by_id_never_by_count(compose: dict[str, Any]) -> None:
    workers = _gpu_workers(compose)
    for name, svc in workers.items():
        for dev in gpu_devices(svc):
            assert dev["driver"] == "nvidia", name
            assert "count" not in dev, f"{name}: `count` gives every replica the same GPUs"
            assert dev.get("device_ids"), f"{name}: name the GPUs in device_ids"
        assert svc.get("deploy", {}).get("replicas", 1) == 1, f"{name}: replicas share its GPUs"
        assert not svc.get("scale"), f"{name}: replicas would share its GPUs"
    assert {"worker-gpu0", "worker-multigpu"} <= workers.keys()
    assert _device_ids(workers["worker-gpu0"]) == ["0"]
    assert len(_device_ids(workers["worker-multigpu"])) >= 2


def test_workers_started_together_never_share_a_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    profiles = {p for s in services.values() for p in s.get("profiles", [])}
    assert {"gpu", "multigpu", "cpu"} <= profiles
    for profile in [None, *sorted(profiles)]:
        active = [
            name
            for name, s in services.items()
            if not s.get("profiles") or profile in s["profiles"]
        ]
        ids = Counter(i for name in active for i in _device_ids(services[name]))
        shared = sorted(i for i, n in ids.items() if n > 1)
        assert not shared, f"profile {profile}: GPUs {shared} reserved by two services"


def test_each_worker_uses_exactly_its_reserved_gpus(compose: dict[str, Any]) -> None:
    for name, svc in _gpu_workers(compose).items():
        env = svc["environment"]
        assert "MUST_WORKER__NUM_GPUS" in env, f"{name}: tell the worker how many GPUs it has"
        assert int(interpolate(env["MUST_WORKER__NUM_GPUS"], {})) == len(_device_ids(svc)), name
        assert "CUDA_VISIBLE_DEVICES" not in env, f"{name}: the reservation already picks the GPUs"


@pytest.mark.parametrize("setup", SETUPS)
def test_workers_get_enough_shared_memory(compose: dict[str, Any], setup: str) -> None:
    services = compose["services"]
    for name in [*_gpu_workers(compose), "worker-cpu"]:
        svc = services[name]
        if svc.get("ipc") == "host":
            continue
        assert "shm_size" in svc, f"{name}: Docker's default /dev/shm is 64 MB"
        size = parse_bytes(interpolate(svc["shm_size"], SETUPS[setup]))
        assert size >= 1024**3, f"{name}: shm_size {size} B with {setup}"


def test_downloaded_weights_live_on_a_persistent_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    named_volumes = compose.get("volumes") or {}
    mounts: dict[str, str] = {}
    for name in ["api", "worker-cpu", *_gpu_workers(compose)]:
        for vol in services[name].get("volumes", []):
            source, _, target = str(vol).partition(":")
            if source == "model-weights":
                mounts[name] = target.split(":")[0]
        assert name in mounts, f"{name} does not mount the model-weights volume"
    assert "model-weights" in named_volumes, "model-weights must be a named (persistent) volume"
    assert len(set(mounts.values())) == 1, mounts
    target = mounts["api"]
    for path in DOCKERFILES:
        env = dockerfile_env(path)
        # open_clip's own downloads go to ~/.cache/clip; HF and torch hub follow these variables.
        assert env.get("XDG_CACHE_HOME") == target, path
        assert f"{env.get('HOME')}/.cache" == target, path
        for var in ("HF_HOME", "TORCH_HOME"):
            assert env.get(var, "").startswith(target + "/"), f"{path}: {var}"
        # A fresh named volume copies the owner of the image's folder: it must belong to the user.
        runs = " ".join(args for op, args in dockerfile(path) if op == "RUN")
        assert f"mkdir -p /data {target}" in runs and f"chown must:must /data {target}" in runs
