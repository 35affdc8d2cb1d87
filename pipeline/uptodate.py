"""Up to date means done: a head, fine-tune or curve point whose inputs match a saved result is reused.

Each result's JSON record carries ``inputs_key``, a hash of everything that can
change its numbers (the cache key or the dataset fingerprint, the settings that
method reads, the seed, the training subset and the versions of the libraries and
of this package). A rerun with the same key and its files present reuses the
result and says so; ``--force`` redoes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.artifacts import library_versions, sha256_file

log = logging.getLogger(__name__)

_VERSIONED = ("python", "numpy", "scikit-learn", "tensorflow", "tensorflow-cpu", "keras", "h5py", "pandas")


def code_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {k: v for k, v in library_versions().items() if k in _VERSIONED}
    try:
        out["transfer-pipeline"] = version("transfer-pipeline")
    except PackageNotFoundError:
        pass
    return out


def inputs_key(**parts: Any) -> str:
    """A short hash of ``parts`` and the code versions."""
    blob = json.dumps({"parts": parts, "versions": code_versions()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def file_digest(path: Path | None) -> str | None:
    """Content hash of an input file (the metadata table)."""
    return None if path is None else sha256_file(path)


def reusable(record: Path, key: str, *files: Path, force: bool = False) -> dict | None:
    """The saved record when its ``inputs_key`` is ``key`` and every file it stands for exists."""
    if force or not record.exists() or not all(Path(f).exists() for f in files):
        return None
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return saved if saved.get("inputs_key") == key else None


def invalidate(record: Path) -> None:
    """Remove a result's record before its files are rewritten: the record is written last and vouches for
    them, so between the two (a kill, a full disk) nothing claims that half-replaced files are a result."""
    Path(record).unlink(missing_ok=True)
