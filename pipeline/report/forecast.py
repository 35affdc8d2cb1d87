"""The Forecast section: what `make forecast` said the full fine-tune would reach, cost and when it pays,
labelled as a forecast everywhere, and set against the measured fine-tune once one exists."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from pipeline.forecast import record
from pipeline.forecast.record import LEVEL, Forecast
from pipeline.forecast.text import backtest_error, duration, headline, sentence
from pipeline.report.plots import log_x_axes, pyplot, save_figure


def read(art: Path, dataset: str) -> tuple[list[Forecast], pd.DataFrame]:
    return record.read(record.path(art, dataset)), record.read_band(record.band_path(art, dataset))


def with_measured(records: list[Forecast], results: pd.DataFrame) -> list[Forecast]:
    """Each forecast beside the fine-tune at its size when one has run since (or before): forecast vs truth."""
    out = []
    for f in records:
        ft = results[(results["method"] == "finetune") & (results["backbone"].astype(str) == f.backbone)]
        ft = ft[(ft["n_train"] == f.target_n) & ft["seed"].isna()]
        out.append(dataclasses.replace(f, measured_accuracy=float(ft["test_accuracy"].iloc[0])) if len(ft) else f)
    return out


def _pairs(records: list[Forecast]) -> list[tuple[Forecast, Forecast | None]]:
    """Per backbone: the forecast at the full size and the one at twice it."""
    out = []
    for f in records:
        if f.target_n == f.n_full:
            double = next((d for d in records if d.backbone == f.backbone and d.target_n == 2 * f.n_full), None)
            out.append((f, double))
    return out


def verdict_lines(records: list[Forecast], measured_full: set[str]) -> list[str]:
    """For a backbone without a full-size fine-tune: the forecast's answer, labelled as one."""
    lines = []
    for f, _ in _pairs(records):
        if f.backbone in measured_full:
            continue
        sizes = [int(s) for s in f.measured_sizes.split()]
        lines.append(f"**Forecast, not measured** ({f.backbone}): {headline(f, sizes)} {backtest_error(f)}")
    return lines


def _row(f: Forecast) -> dict:
    measured = f.measured_accuracy
    return {
        "training images": f"{f.target_n:,}",
        "forecast fine-tune": f"{f.accuracy:.4f}",
        f"{LEVEL:.0%} interval": f"{f.low:.3f} … {f.high:.3f}",
        "best head": f"{f.best_head} {f.best_head_accuracy:.4f}",
        "P(fine-tune better)": f"{f.p_beats_head:.2f}",
        "forecast cost": duration(f.cost_seconds),
        "status": f.status,
        "measured": "" if math.isnan(measured) else f"{measured:.4f} ({(measured - f.accuracy) * 100:+.1f} pt)",
    }


def sections(records: list[Forecast], band: pd.DataFrame, results: pd.DataFrame, out_dir: Path, dataset: str):
    out: list[tuple[str, object]] = []
    records = with_measured(records, results)
    for f, double in _pairs(records):
        sizes = [int(s) for s in f.measured_sizes.split()]
        text = sentence(f, double, sizes).replace("\n", " ")
        label = f" ({f.backbone})" if len({r.backbone for r in records}) > 1 else ""
        out.append(
            (
                f"Forecast{label}",
                f"{text} A forecast, not a measurement: fitted on the fine-tunes at {', '.join(map(str, sizes))} "
                f"images and widened by the error measured where such forecasts were checked against fine-tunes "
                f"that were then run.",
            )
        )
        out.append(("", pd.DataFrame([_row(r) for r in (f, double) if r is not None])))
        png = out_dir / f"forecast_{f.backbone}.png"
        plot(f, band[band["backbone"] == f.backbone], results, png, dataset)
        out.append(("", png))
    return out


def plot(f: Forecast, band: pd.DataFrame, results: pd.DataFrame, path: Path, dataset: str) -> None:
    """Both curves, the measured points, the forecast band, the crossover band and the full size."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    ax.plot(band["n"], band["accuracy"], color="C3", label="fine-tune: forecast")
    ax.fill_between(band["n"], band["low"], band["high"], color="C3", alpha=0.15, label=f"{LEVEL:.0%} interval")
    ax.plot(band["n"], band["head"], color="C0", linestyle="--", label=f"{f.best_head} (measured; fitted beyond)")
    ft = results[(results["method"] == "finetune") & (results["backbone"].astype(str) == f.backbone)]
    used = ft["n_train"].isin([float(s) for s in f.measured_sizes.split()])
    ax.scatter(ft.loc[used, "n_train"], ft.loc[used, "test_accuracy"], marker="*", s=90, color="C3", zorder=3,
               label="fine-tunes it rests on")  # fmt: skip
    other = ft[~used & (ft["n_train"] < f.n_full)]
    if len(other):
        ax.scatter(other["n_train"], other["test_accuracy"], marker="*", s=60, facecolors="none",
                   edgecolors="grey", zorder=3, label="other fine-tunes (not used)")  # fmt: skip
    if not math.isnan(f.measured_accuracy):
        ax.scatter([f.n_full], [f.measured_accuracy], marker="*", s=160, color="k", zorder=4, label="full, measured")
    ax.axvline(f.n_full, color="grey", linewidth=1)
    if math.isfinite(f.crossover_n):
        lo = f.crossover_low if math.isfinite(f.crossover_low) else band["n"].min()
        hi = f.crossover_high if math.isfinite(f.crossover_high) else band["n"].max()
        ax.axvspan(lo, hi, color="C2", alpha=0.1, label="crossover range")
        ax.axvline(f.crossover_n, color="C2", linestyle=":", label="crossover")
    log_x_axes(ax, "training images (log scale)", f"{dataset}: fine-tune forecast against the best head")
    ax.xaxis.set_major_locator(plt.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.text(f.n_full, ax.get_ylim()[1], " your data", color="grey", fontsize=8, va="top")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
