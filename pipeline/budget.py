"""`--memory-budget`: heads that need the whole matrix in memory refuse, in one line, when it will not fit.

Killed by the kernel's OOM killer after minutes of work is the worst way to learn that a
cache is too big; the estimate below is made from the cache's shapes before anything is
loaded. ``linear_probe`` streams from the cache and is never refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_FRACTION = 0.75
OVERHEAD = 300 * 2**20  # the interpreter, numpy, scikit-learn, h5py
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse(text: str | None) -> int:
    """``8G``, ``512M``, ``2.5G``, a byte count, or a fraction of available RAM (``0.5``); None: the default."""
    if text is None or str(text).strip() == "":
        return int(DEFAULT_FRACTION * available_bytes())
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PipelineError(f"--memory-budget {text!r}: give a size like 8G or 512M, or a fraction of RAM like 0.5")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit and value <= 1.0:
        return int(value * available_bytes())
    return int(value * _UNITS[unit])


def cache_shape(path: Path) -> tuple[dict[str, int], int]:
    """(rows per split, feature width of last + every tap), from the cache's metadata only."""
    from pipeline.features import reading

    with reading(path) as f:
        taps = json.loads(f.attrs.get("tap_layers", "[]"))
        rows = {s: f[s]["embeddings"].shape[0] for s in ("train", "val", "test")}
        width = f["train"]["embeddings"].shape[1] + sum(f["train"]["taps"][n].shape[1] for n in taps)
    return rows, width


def need(head: str, rows: dict[str, int], width: int, cfg, with_meta: bool) -> int:
    """Bytes an in-memory head needs: the packed cache, a fused copy with metadata, the standardised copy of
    train + val it is tuned on (the shared arrays are never scaled in place), and its own working set."""
    cache = sum(rows.values()) * width * 4
    n, n_val = rows["train"], rows["val"]
    own = {
        "ridge": 3 * width * width * 8,
        "rbf_svm": (lambda m: m * m * 8 + n_val * m * 2 + m * width * 4)(min(cfg.heads.rbf_max_train, n)),
        "knn": n * width * 4,
        "mlp": n * width * 4,
    }.get(head, n * width * 8 if n * width <= cfg.heads.exact_max_size else 0)
    scaled = (n + n_val) * width * 4
    return OVERHEAD + cache * (2 if with_meta else 1) + scaled + own


def check(heads: list[str], path: Path, cfg, with_meta: bool) -> None:
    """Raise one line naming ``linear_probe`` when any in-memory head would exceed the budget."""
    limit = parse(cfg.heads.memory_budget)
    rows, width = cache_shape(path)
    over = {h: need(h, rows, width, cfg, with_meta) for h in heads}
    over = {h: b for h, b in over.items() if b > limit}
    if over:
        worst = max(over.values())
        raise PipelineError(
            f"{', '.join(over)} need ~{worst / 2**30:.1f} GiB in memory for {sum(rows.values()):,} rows x {width:,} "
            f"features but the memory budget is {limit / 2**30:.1f} GiB (--memory-budget): fit --heads linear_probe, "
            "which streams from the cache, or raise the budget"
        )
