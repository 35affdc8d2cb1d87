"""The forecast in words: the answer first, in one sentence, then what it rests on and what to do next."""

from __future__ import annotations

import dataclasses
import math
import shlex

from pipeline.config import flags
from pipeline.forecast.record import LEVEL, Forecast


def duration(s: float) -> str:
    if not math.isfinite(s):
        return "an unknown time"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def _n(v: float) -> str:
    """A size as people say it: 7,000 rather than 6,983."""
    if not math.isfinite(v):
        return "?"
    digits = max(len(str(int(v))) - 2, 0)
    return f"{round(v, -digits):,.0f}"


def interval(f: Forecast) -> str:
    return f"{f.accuracy:.3f} ({f.low:.3f} … {f.high:.3f}, {LEVEL:.0%} interval)"


def crossover_text(f: Forecast, smallest: int) -> str:
    if math.isnan(f.crossover_n):
        return f"Within twice your data it is not forecast to beat {f.best_head}."
    if f.crossover_n <= smallest * 1.001:
        return f"It is forecast to beat {f.best_head} already at {smallest:,} images, the smallest size run."
    hi = _n(f.crossover_high) if math.isfinite(f.crossover_high) else f"beyond {_n(2 * f.n_full)}"
    lo = _n(f.crossover_low) if math.isfinite(f.crossover_low) else f"under {smallest:,}"
    return f"Fine-tuning starts to pay at about {_n(f.crossover_n)} images ({lo} … {hi})."


def headline(full: Forecast, sizes: list[int]) -> str:
    """The answer in one sentence: "Fine-tuning all N images is forecast at A (low … high), ± against the
    best head, for about T on this machine", or "Cannot tell yet …" with the next size to run."""
    gap = (full.accuracy - full.best_head_accuracy) * 100
    what = f"Fine-tuning all {full.target_n:,} images"
    if full.decided:
        return (
            f"{what} is forecast at {interval(full)}, {gap:+.1f} pt against {full.best_head} "
            f"({full.best_head_accuracy:.3f}; P(fine-tune better) = {full.p_beats_head:.2f}), "
            f"for about {duration(full.cost_seconds)} on this machine; this forecast cost "
            f"{duration(full.forecast_seconds)}."
        )
    head = (
        f"Cannot tell yet whether {what[0].lower() + what[1:]} beats {full.best_head} "
        f"({full.best_head_accuracy:.3f}): forecast {interval(full)}, about {duration(full.cost_seconds)} "
        f"on this machine; this forecast cost {duration(full.forecast_seconds)}."
    )
    if math.isfinite(full.next_n):
        head += (
            f" Fine-tune {int(full.next_n):,} images next (about {duration(full.next_seconds)}): "
            f"--ladder {' '.join(map(str, sizes))} {int(full.next_n)}."
        )
    return head


def backtest_error(f: Forecast) -> str:
    """The error such forecasts were measured to make, which every forecast is printed with."""
    return (
        f"Measured error of such forecasts at {f.ratio:.0f}× extrapolation: ±{f.extrapolation_sd * 100:.1f} pt "
        f"(sd, from {f.backtest_cases} backtest{'s' if f.backtest_cases != 1 else ''}), included in the interval."
    )


def sentence(full: Forecast, double: Forecast | None, sizes: list[int]) -> str:
    """The headline, then the crossover, twice the data, the forecast's measured error and, once the full
    fine-tune has run, the forecast against it."""
    lines = [headline(full, sizes), crossover_text(full, sizes[0])]
    if double is not None:
        lines.append(
            f"With twice the labelled images ({double.target_n:,}): {interval(double)}"
            f"{'' if double.decided else ', cannot tell yet'}."
        )
    lines.append(backtest_error(full))
    if math.isfinite(full.measured_accuracy):
        err = (full.measured_accuracy - full.accuracy) * 100
        lines.append(
            f"The full fine-tune was run: measured {full.measured_accuracy:.4f} ({err:+.1f} pt from the forecast)."
        )
    return "\n".join(lines)


def budget_text(f: Forecast, budget: float, cfg) -> str:
    """Why the full fine-tune was not run, and the exact command that runs it (every setting of the data,
    backbone and fine-tune that differs from its default, so it trains what was forecast)."""
    args = ["python", "-m", "pipeline", "finetune", "--dataset", cfg.data.dataset, "--artifacts", cfg.artifacts]
    sections = ["data", "backbone", "finetune"]  # the `finetune` command's, in its order
    named = flags(sections, {"--config", "--artifacts"})
    for section in sections:
        current = getattr(cfg, section)
        default = type(current)()
        for field in dataclasses.fields(current):
            value = getattr(current, field.name)
            if field.name == "dataset" or value == getattr(default, field.name):
                continue
            flag = named[section, field.name]
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag.removeprefix("--"))
            elif value is not None:
                args += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
    return (
        f"The full fine-tune is forecast at about {duration(f.cost_seconds)}, over the --finetune-budget of "
        f"{duration(budget)}: not run. To run it:\n  {shlex.join(args)}"
    )
