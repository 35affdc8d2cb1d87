"""Memory a stage may use: ``--memory-budget`` for the heads, the decoded images of the fine-tune.

Killed by the kernel's OOM killer after minutes of work is the worst way to learn that something does not
fit; stages size what they hold against this before loading it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.errors import PipelineError

DEFAULT_FRACTION = 0.75
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def cores() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping), else free pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse(text: str | None, default_fraction: float = DEFAULT_FRACTION) -> int:
    """``8G``, ``512M``, ``2.5G``, a byte count, or a fraction of available RAM (``0.5``); None: the default."""
    if text is None or str(text).strip() == "":
        return int(default_fraction * available_bytes())
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise PipelineError(f"--memory-budget {text!r}: give a size like 8G or 512M, or a fraction of RAM like 0.5")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit and value <= 1.0:
        return int(value * available_bytes())
    return int(value * _UNITS[unit])
