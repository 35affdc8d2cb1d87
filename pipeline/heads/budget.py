"""`--memory-budget`: heads that need the whole matrix in memory refuse, in one line, when it will not fit.

Killed by the kernel's OOM killer after minutes of work is the worst way to learn that a
cache is too big; the estimate below is made from the cache's shapes before anything is
loaded. ``linear_probe`` streams from the cache and is never refused.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.cache.reader import cache_shape
from pipeline.errors import PipelineError
from pipeline.heads import registry

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


def need(head: str, rows: dict[str, int], width: int, h, with_meta: bool) -> int:
    """Bytes an in-memory head needs: the packed cache, a fused copy with metadata, the standardised copy of
    train + val it is tuned on (the shared arrays are never scaled in place), and its own working set
    (``heads.registry``); ``h``: the heads settings."""
    cache = sum(rows.values()) * width * 4
    n, n_val = rows["train"], rows["val"]
    own = registry.get(head).working_bytes(n, n_val, width, h)
    scaled = (n + n_val) * width * 4
    return OVERHEAD + cache * (2 if with_meta else 1) + scaled + own


def check(heads: list[str], path: Path, h, with_meta: bool) -> None:
    """Raise one line naming ``linear_probe`` when any in-memory head would exceed the budget."""
    limit = parse(h.memory_budget)
    rows, width = cache_shape(path)
    over = {head: need(head, rows, width, h, with_meta) for head in heads}
    over = {head: b for head, b in over.items() if b > limit}
    if over:
        worst = max(over.values())
        raise PipelineError(
            f"{', '.join(over)} need ~{worst / 2**30:.1f} GiB in memory for {sum(rows.values()):,} rows x {width:,} "
            f"features but the memory budget is {limit / 2**30:.1f} GiB (--memory-budget): fit --heads linear_probe, "
            "which streams from the cache, or raise the budget"
        )
