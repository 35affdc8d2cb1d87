"""Writing a cache: rows appended to ``<name>.h5.partial`` a storage chunk at a time and flushed, each
group's resume point (``next_index``) advanced only after its rows are on disk, the file renamed into place
when complete. Batches are held until a chunk's worth has come (one HDF5 write per dataset per chunk, not
per batch: those writes run between forward passes, on the cores the model needs), and an interrupted run
writes what it holds before it stops, so it resumes from its last batch; a killed one loses at most the
chunk in hand. A full disk is met *before* a batch is taken (HDF5 turns a write that fails half way into a
file it can no longer open), so the partial file stays whole and resumes once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.data import SPLITS
from pipeline.errors import DISK_FULL, PipelineError, first_line
from pipeline.extract.cache.key import VIEWS, differences, read_key

log = logging.getLogger(__name__)

CHUNK_ROWS = 256  # rows per storage chunk: the stream reads whole chunks
SLACK = 256 * 2**10  # HDF5's own metadata and heap growth per batch, beyond the rows and a new chunk per dataset


@dataclass(frozen=True)
class TapLayout:
    """One tapped layer's dataset: its name, width and (for the record) the layer's shape and grid."""

    layer: str
    width: int
    shape: tuple[int, ...] = ()
    grid: int = 1


@dataclass
class Contents:
    """A complete cache's row count, skipped ids per split, extraction seconds and augmented views."""

    n: int
    skipped: dict[str, list[str]]
    seconds: float
    n_views: int


def complete_contents(path: Path, key: dict) -> Contents | None:
    """The contents of the complete cache at ``path`` made with ``key``, or None (and why) when it must be
    (re)built. An unreadable cache (truncated, corrupted) is rebuilt: it holds nothing a rerun cannot
    make again."""
    if not path.exists():
        return None
    try:
        with h5py.File(path, "r") as f:
            old = read_key(f.attrs)
            if old == key and f.attrs.get("complete"):
                return _contents(f)
    except (OSError, KeyError) as e:
        log.warning("warning: cache %s is unreadable (%s); rebuilding it", path, first_line(e))
        return None
    log.info("cache %s is stale (%s); re-extracting", path, "; ".join(differences(old, key)))
    return None


def _contents(f: h5py.File) -> Contents:
    n = sum(f[s]["ids"].shape[0] for s in SPLITS)
    skipped = {s: f[s]["skipped"].asstr()[()].tolist() for s in SPLITS}
    n_views = int(f[VIEWS]["ids"].shape[0]) if VIEWS in f else 0
    return Contents(n, skipped, float(f.attrs["extract_seconds"]), n_views)


def ensure_room(path: Path, nbytes: int) -> None:
    """Raise ENOSPC (or EFBIG under a file-size limit) *before* a write that would not fit."""
    free = shutil.disk_usage(path.parent).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    size = path.stat().st_size if path.exists() else 0
    if nbytes > free or (limit != resource.RLIM_INFINITY and size + nbytes > limit):
        raise OSError(errno.ENOSPC if nbytes > free else errno.EFBIG, os.strerror(errno.ENOSPC), str(path))


class CacheWriter:
    """The partial file of one cache: reopened when made with the same key, else started anew."""

    def __init__(
        self, out: Path, key: dict, dim: int, taps: list, groups: tuple[str, ...] = SPLITS, chunk_rows: int = CHUNK_ROWS
    ):
        """``taps``: anything with ``layer`` and ``width`` (``taps.Tap``, ``TapLayout``), in network order."""
        self.out = Path(out)
        self.chunk_rows = chunk_rows
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.groups = groups
        self.f = self._open(key, dim, taps)
        self._held: dict[str, list[list]] = {g: [] for g in groups}  # batches not yet written, by group
        self._next: dict[str, int] = {}  # each group's resume point once its held batches are written
        self._seconds = 0.0  # extraction seconds not yet recorded

    def _open(self, key: dict, dim: int, taps: list) -> h5py.File:
        if self.partial.exists():
            f = self._reopen(key)
            if f is not None:
                return f
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        f = h5py.File(self.partial, "w")
        f.attrs.update(key)
        f.attrs["extract_seconds"] = 0.0
        f.attrs["tap_layers"] = json.dumps([t.layer for t in taps])
        f.attrs["tap_shapes"] = json.dumps({t.layer: list(t.shape) for t in taps})  # for readable labels
        for s in self.groups:
            _create_rows(f.create_group(s), dim, taps, self.chunk_rows)
        f.flush()
        return f

    def _reopen(self, key: dict) -> h5py.File | None:
        try:
            f = h5py.File(self.partial, "a")
        except OSError:
            log.warning("warning: %s is unreadable (killed mid-write?); starting over", self.partial.name)
            self.partial.unlink()
            return None
        if read_key(f.attrs) == key and all(s in f for s in self.groups):
            for s in self.groups:  # rows past the resume point are a batch cut short: dropped
                rows = int(f[s].attrs["rows"])
                for name in _row_datasets(f[s]):
                    f[s][name].resize(rows, axis=0)
            log.info("resuming %s: %d embeddings already written", self.partial.name, self.rows_written(f))
            return f
        f.close()
        log.info("discarding %s: it was made with other settings", self.partial.name)
        self.partial.unlink()
        return None

    def rows_written(self, f: h5py.File | None = None) -> int:
        f = f or self.f
        return sum(int(f[g].attrs["rows"]) for g in f if "rows" in f[g].attrs)

    def next_index(self, group: str) -> int:
        return int(self.f[group].attrs["next_index"])

    def set_attrs(self, **attrs) -> None:
        self.f.attrs.update(attrs)

    def add_seconds(self, seconds: float) -> None:
        self._seconds += seconds

    def append(self, group: str, embeddings, labels, ids: list[str], next_index: int, taps=()) -> None:
        """Take one batch (and its taps); its rows are written, and only then the resume point advanced
        (crash-consistent order), once the group holds a storage chunk's worth."""
        columns = [embeddings, labels, np.asarray(ids, dtype=object), *taps]
        # room for everything held, this batch, a new storage chunk per dataset at worst, and HDF5's slack
        chunk_bytes = sum(self.chunk_rows * int(np.prod(c.shape[1:])) * 4 for c in (embeddings, *taps))
        held = sum(c.nbytes for batches in self._held.values() for b in batches for c in b)
        ensure_room(self.partial, held + chunk_bytes + sum(len(i) + 16 for i in ids) + len(ids) * 8 + SLACK)
        self._held[group].append(columns)
        self._next[group] = next_index
        if sum(len(b[0]) for b in self._held[group]) >= self.chunk_rows:
            self._write(group)

    def advance(self, group: str, next_index: int) -> None:
        """Move the resume point past items that gave no row (unreadable files)."""
        if self._held[group]:
            self._next[group] = next_index
        else:
            self.f[group].attrs["next_index"] = next_index

    def _write(self, group: str) -> None:
        """The group's held batches written as one block, then its resume point and the seconds recorded."""
        batches, self._held[group], next_index = self._held[group], [], self._next.pop(group)
        g = self.f[group]
        rows = int(g.attrs["rows"])
        n = sum(len(b[0]) for b in batches)
        for k, name in enumerate(_row_datasets(g)):
            g[name].resize(rows + n, axis=0)
            g[name][rows:] = np.concatenate([b[k] for b in batches])
        self.f.flush()
        g.attrs.update(rows=rows + n, next_index=next_index)
        self._record_seconds()
        self.f.flush()

    def _record_seconds(self) -> None:
        self.f.attrs["extract_seconds"] = float(self.f.attrs["extract_seconds"]) + self._seconds
        self._seconds = 0.0

    def write_held(self) -> None:
        """Every held batch written (the room for them was checked when each was taken)."""
        for group in self.groups:
            if self._held[group]:
                self._write(group)
        self._record_seconds()
        self.f.flush()

    def finish_pass(self, sources: dict[str, list[str]]) -> None:
        """Every id of ``sources`` ({group: ids}) is done: record the resume point and the skipped ids."""
        self.write_held()
        for group, ids in sources.items():
            g = self.f[group]
            g.attrs["next_index"] = len(ids)
            written = set(g["ids"].asstr()[()])
            skipped = list(dict.fromkeys(i for i in ids if i not in written))
            if "skipped" in g:
                del g["skipped"]
            g.create_dataset("skipped", data=np.asarray(skipped, dtype=object), dtype=h5py.string_dtype())
            if skipped:
                log.warning(
                    "warning: skipped %d unreadable file(s) in %s: %s", len(skipped), group, ", ".join(skipped[:10])
                )
        self.f.flush()

    def complete(self, **attrs) -> Contents:
        """Mark the cache complete, close it and rename it into place. A failure of the last flush
        propagates: the partial file is never renamed into place."""
        self.write_held()
        self.f.attrs.update(complete=True, **attrs)
        contents = _contents(self.f)
        self.f.close()
        self.partial.replace(self.out)
        return contents

    def abort(self) -> None:
        """Close after a failure, the held batches written first (an interrupted run keeps every batch it
        computed); a failed write may fail these too: the first error is the one said."""
        with contextlib.suppress(RuntimeError, OSError):
            self.write_held()
        with contextlib.suppress(RuntimeError, OSError):
            self.f.close()

    def disk_full(self, e: Exception, total: int, width: int) -> PipelineError | None:
        """A full disk (or file-size limit) met while writing, in one line: where, what is free, what the
        remaining of ``total`` rows need, and that the rows written so far resume. None for other errors."""
        code = getattr(e, "errno", None)
        if code not in DISK_FULL and not any(f"errno = {c}" in str(e) for c in DISK_FULL):
            return None
        with contextlib.suppress(RuntimeError, OSError):
            self.write_held()  # their room was checked when they were taken: they are kept
        done = self.rows_written()
        need = (total - done) * (width * 4 + 64)
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if code == errno.EFBIG and limit != resource.RLIM_INFINITY:
            room = f"the file-size limit (ulimit -f) is {_mib(limit)}"
        else:
            room = f"{_mib(shutil.disk_usage(self.partial.parent).free)} free on the disk of {self.partial.parent}"
        whole = isinstance(e, OSError) and code is not None  # stopped before the write: the partial file is whole
        kept = (
            f"the {done:,} rows written are kept; free space and rerun the same command to resume"
            if whole
            else "HDF5 failed mid-write, so the partial file may be damaged (a rerun restarts it); free space first"
        )
        return PipelineError(
            f"disk full writing {self.partial} ({room}; the remaining {total - done:,} images need ~{_mib(need)} "
            f"more): {kept}"
        )


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _create_rows(g: h5py.Group, dim: int, taps: list, chunk_rows: int) -> None:
    g.create_dataset("embeddings", (0, dim), "float32", maxshape=(None, dim), chunks=(chunk_rows, dim))
    g.create_dataset("labels", (0,), "int64", maxshape=(None,), chunks=(4096,))
    g.create_dataset("ids", (0,), h5py.string_dtype(), maxshape=(None,), chunks=(4096,))
    if taps:
        tg = g.create_group("taps")
        for t in taps:
            d = tg.create_dataset(
                t.layer, (0, t.width), "float32", maxshape=(None, t.width), chunks=(chunk_rows, t.width)
            )
            d.attrs.update(layer=t.layer, width=t.width, shape=list(getattr(t, "shape", ())), grid=t.grid)
    g.attrs.update(rows=0, next_index=0)


def _row_datasets(g: h5py.Group) -> list[str]:
    """Every per-row dataset of a group: embeddings, labels, ids, then its taps in order."""
    names = ["embeddings", "labels", "ids"]
    if "taps" in g:
        names += [f"taps/{n}" for n in json.loads(g.file.attrs["tap_layers"])]
    return names


def write_cache(out: Path, attrs: dict, splits: dict[str, dict], chunk_rows: int = CHUNK_ROWS) -> Path:
    """A complete cache from arrays in memory, through the writer (tests, benchmarks, imports from other
    tools). ``splits``: {group: {"embeddings", "labels", "ids", optional "taps": {layer: array}}}; ``attrs``
    (the key, class_names, backbone, weights, extract_seconds...) are stored as given."""
    first = next(iter(splits.values()))
    layers = list(first.get("taps", {}))
    taps = [TapLayout(n, int(first["taps"][n].shape[1])) for n in layers]
    w = CacheWriter(out, {}, int(first["embeddings"].shape[1]), taps, tuple(splits), chunk_rows)
    try:
        for group, d in splits.items():
            ids = [str(i) for i in d["ids"]]
            taps_of = [np.asarray(d["taps"][n], np.float32) for n in layers]
            w.append(group, np.asarray(d["embeddings"], np.float32), np.asarray(d["labels"]), ids, len(ids), taps_of)
        w.finish_pass({g: [str(i) for i in d["ids"]] for g, d in splits.items()})
        w.complete(**{"extract_seconds": 0.0, **attrs})
    except BaseException:
        w.abort()
        raise
    return Path(out)
