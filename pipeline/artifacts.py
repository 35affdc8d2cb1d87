"""Writing artifacts safely: atomic replacement (a reader never sees half a file, a failed write leaves
the old one), an unwritable folder refused before any work, and the run record (resolved config +
library versions) every stage stores beside what it made."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def sha256_file(path: Path) -> str:
    """A file's content hash, read in 1 MiB blocks (weights files are tens of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a number in our artifacts."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("numpy", "h5py", "scikit-learn", "pandas", "joblib", "tensorflow", "tensorflow-cpu", "keras"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def run_record(cfg, stage: str, **extra: Any) -> dict[str, Any]:
    """What a stage records with its output: the resolved config (``cfg.to_dict()``) and library versions."""
    return {
        "stage": stage,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "versions": library_versions(),
        **extra,
    }


def writable_dir(path: Path) -> Path:
    """Create an artifact folder up front, so an unwritable one fails before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ""):
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds,
    so a reader never sees half a file and a failed write leaves the old one intact.
    ``suffix`` keeps an extension some writers insist on (Keras: ``.keras``, ``.weights.h5``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
