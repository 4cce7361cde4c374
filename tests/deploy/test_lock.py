"""The lock: one constraints file with exact pins of everything CI tests, which scripts/bootstrap (CI
and development) and both images install with, so an image never ships an untested torch.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy.helpers import DOCKERFILES, LOCK, ROOT, dockerfile, pip_installs, read_lock

# The torch/torchvision pair CI runs; pip drags in another torch build unless both are pinned.
TORCH, TORCHVISION = "2.14.1", "0.29.1"
_CONSTRAINT = re.compile(r"(?:-c|--constraint)[ =](\S+)")
_EXTRAS = re.compile(r"'?\.\[([a-z,]+)\]'?")


def _bootstrap_installs() -> list[str]:
    lines = (ROOT / "scripts" / "bootstrap").read_text().splitlines()
    return [c for c in pip_installs(lines) if "--upgrade pip" not in c]


def _image_installs(path: str) -> list[str]:
    return pip_installs([args for op, args in dockerfile(path) if op == "RUN"])


def _extras(commands: list[str]) -> set[str]:
    return {e for c in commands for m in _EXTRAS.finditer(c) for e in m.group(1).split(",")}


def _installed_closure(roots: list[Requirement]) -> dict[str, Version]:
    """Installed versions of ``roots`` and everything they require, markers evaluated here."""
    versions: dict[str, Version] = {}
    expanded: set[tuple[str, str]] = set()
    todo = [(r, "") for r in roots]  # (requirement, extra of the package that declared it)
    while todo:
        req, declared_in = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": declared_in}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise AssertionError(f"{req.name} is required but not installed") from None
        versions[name] = Version(dist.version)
        for extra in {"", *req.extras}:
            if (name, extra) not in expanded:
                expanded.add((name, extra))
                todo += [(Requirement(r), extra) for r in dist.requires or []]
    return versions


def test_lock_pins_torch_and_torchvision_together() -> None:
    lock = read_lock()
    assert (lock.get("torch"), lock.get("torchvision")) == (TORCH, TORCHVISION)
    # torchvision's metadata names the torch it was built for: the pair must agree.
    reqs = [Requirement(r) for r in metadata.requires("torchvision") or []]
    torch_reqs = [r for r in reqs if canonicalize_name(r.name) == "torch"]
    assert torch_reqs and all(r.specifier.contains(TORCH) for r in torch_reqs), torch_reqs


def test_lock_is_exactly_what_ci_installs() -> None:
    """Every package bootstrap installs (the project's extras and all they pull in) is pinned, at the
    version this test run uses; nothing else is. Fails after a dependency change until the lock is
    regenerated (docs/service.md, "The lock")."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r) for r in project["dependencies"]]
    extras = _extras(_bootstrap_installs())
    assert {"service", "dev"} <= extras
    for extra in sorted(extras):
        roots += [Requirement(r) for r in project["optional-dependencies"][extra]]
    installed = _installed_closure(roots)
    lock = {name: Version(v) for name, v in read_lock().items()}
    unpinned = sorted(set(installed) - set(lock))
    assert not unpinned, f"installed but not in {LOCK}: {unpinned}"
    drift = {n: f"{v} installed, {lock[n]} locked" for n, v in installed.items() if lock[n] != v}
    assert not drift, drift
    stale = sorted(set(lock) - set(installed))
    assert not stale, f"locked but required by nothing: {stale}"


def test_ci_and_both_images_install_with_the_same_lock() -> None:
    boot = _bootstrap_installs()
    assert boot
    used = {m.group(1) for c in boot for m in _CONSTRAINT.finditer(c)}
    assert used == {LOCK} and all(_CONSTRAINT.search(c) for c in boot), boot
    for path in DOCKERFILES:
        installs = _image_installs(path)
        for cmd in installs:
            assert f"-c {LOCK}" in cmd, f"{path}: {cmd!r} ignores the lock"
            assert "index-url" not in cmd, f"{path}: another index can serve another torch build"
            assert not re.search(r"[=<>~!]=", cmd), f"{path}: versions come from {LOCK} only"
        assert any("torch" in c.split() for c in installs), f"{path}: installs torch explicitly"
        assert _extras(installs) <= _extras(boot), f"{path}: installs an extra CI does not test"
        steps = dockerfile(path)
        copies = [i for i, (op, a) in enumerate(steps) if op == "COPY" and LOCK in a.split()[:-1]]
        pips = [i for i, (op, a) in enumerate(steps) if op == "RUN" and "pip install" in a]
        assert copies and copies[0] < pips[0], f"{path}: copy {LOCK} before the first pip install"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(fnmatch.fnmatch(LOCK, p) for p in ignored), ".dockerignore drops the lock"
