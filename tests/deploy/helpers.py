"""Static readers for the deployment files: compose interpolation, Dockerfile instructions, the lock."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = "constraints-ci.txt"
DOCKERFILES = ("docker/api.Dockerfile", "docker/worker-gpu.Dockerfile")
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3}  # Compose units: b, k, m, g, kb, mb, gb (powers of 1024)


def interpolate(value: Any, variables: dict[str, str]) -> str:
    """Compose's ``${VAR:-default}``: the variable when set and not empty, else the default."""
    return _VAR.sub(lambda m: variables.get(m.group(1)) or (m.group(2) or ""), str(value))


def env_example() -> dict[str, str]:
    """The variables of .env.example, inline comments removed (what `cp .env.example .env` sets)."""
    out: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        m = re.match(r"^([A-Z0-9_]+)=(\S*)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def parse_bytes(value: str) -> int:
    """A Compose byte value (``16gb``, ``512m``, ``1073741824``) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([kmg]?)b?", value.strip().lower())
    assert m, f"not a Compose byte value: {value!r}"
    return int(m.group(1)) << (10 * _POWERS[m.group(2)])


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    """The service's GPU device reservations (``deploy.resources.reservations.devices``)."""
    devices = (
        service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    )
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def dockerfile(path: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in (ROOT / path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        op, _, rest = (buf + line).partition(" ")
        out.append((op.upper(), " ".join(rest.split())))
        buf = ""
    return out


def dockerfile_env(path: str) -> dict[str, str]:
    """Every ``ENV KEY=value`` of a Dockerfile."""
    env: dict[str, str] = {}
    for op, args in dockerfile(path):
        if op == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def pip_installs(commands: list[str]) -> list[str]:
    """The ``pip install`` commands inside shell command lines (split on ``&&``)."""
    parts = [p.strip() for c in commands for p in c.split("&&")]
    return [p for p in parts if re.search(r"\bpip install\b", p)]


def read_lock() -> dict[str, str]:
    """The lock as ``{canonical name: version}``; every entry must be an exact ``==`` pin."""
    pins: dict[str, str] = {}
    for line in (ROOT / LOCK).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~,]+)", line)
        assert m, f"{LOCK}: not an exact pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"{LOCK}: {name} pinned twice"
        pins[name] = m.group(2)
    return pins
