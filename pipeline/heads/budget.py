"""`--memory-budget`: heads that need the whole matrix in memory refuse, in one line, when it will not fit.

Killed by the kernel's OOM killer after minutes of work is the worst way to learn that a
cache is too big; the estimate below is made from the cache's shapes before anything is
loaded. ``linear_probe`` streams from the cache and is never refused.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.extract.cache.reader import cache_shape
from pipeline.heads import registry
from pipeline.resources import parse

OVERHEAD = 300 * 2**20  # the interpreter, numpy, scikit-learn, h5py


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
