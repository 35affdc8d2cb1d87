"""The forecast's own table, artifacts/results/<dataset>.forecast.csv: forecast rows, never mixed with
the measured ones. This module owns the format: the stage writes ``Forecast`` records and the report reads
them back through the same type, so a renamed or missing field fails loudly instead of vanishing."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pipeline import lock
from pipeline.artifacts import atomic_path
from pipeline.errors import PipelineError, first_line

VERSION = 1
LEVEL = 0.9  # every interval the forecast states is a 90% one


@dataclass(frozen=True)
class Forecast:
    """The fine-tune forecast at one training size, what it rests on and what it decides."""

    dataset: str
    backbone: str
    target_n: int  # training images forecast for: the full training split, or twice it
    n_full: int
    accuracy: float  # forecast test accuracy of the full recipe's fine-tune
    low: float
    high: float
    measured_sizes: str  # the fine-tune's sizes the forecast extrapolates from, space separated
    ratio: float  # target_n over the largest measured size
    form_weights: str  # e.g. "pow2 0.50 pow3 0.50"
    fit_sd: float  # the fit's own spread (bootstrap), in accuracy
    noise_sd: float  # one run's test-set and training-seed noise
    extrapolation_sd: float  # the error backtests measured at this ratio
    backtest_cases: int  # how many measured cases that error rests on
    best_head: str  # the best head by validation at the full size, and its measured test accuracy
    best_head_accuracy: float
    p_beats_head: float  # probability that the fine-tune at target_n beats it
    crossover_n: float  # the size where that probability passes one half (NaN: not within the range looked at)
    crossover_low: float
    crossover_high: float
    cost_seconds: float  # forecast seconds of the full recipe's fine-tune at target_n, on this machine
    forecast_seconds: float  # what the evidence cost: the small fine-tunes, their seeds and the heads' subsets
    status: str  # "forecast" or "cannot tell"
    next_n: float  # when it cannot tell: the next size to fine-tune, and its forecast seconds
    next_seconds: float
    measured_accuracy: float = math.nan  # the fine-tune at target_n, when one was run: forecast beside it
    version: int = VERSION
    timestamp: str = ""

    @property
    def decided(self) -> bool:
        return self.status == "forecast"

    def to_row(self) -> dict:
        row = dataclasses.asdict(self)
        row["timestamp"] = row["timestamp"] or datetime.now(UTC).isoformat(timespec="seconds")
        return row

    @classmethod
    def from_row(cls, row: dict, where: str) -> Forecast:
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing, unknown = sorted(required - set(row)), sorted(set(row) - names)
        if missing or unknown:
            what = "; ".join(x for x in (_named("no field", missing), _named("unknown field", unknown)) if x)
            raise PipelineError(f"{where}: {what}; rerun `make forecast` to rewrite it")
        return cls(**{k: _plain(v) for k, v in row.items()})


def _named(what: str, names: list[str]) -> str:
    return f"{what}(s) {', '.join(names)}" if names else ""


def _plain(v):
    return v.item() if hasattr(v, "item") else ("" if v is None else v)


def path(artifacts: str | Path, dataset: str) -> Path:
    return Path(artifacts) / "results" / f"{dataset}.forecast.csv"


def read(file: Path) -> list[Forecast]:
    if not Path(file).exists():
        return []
    try:
        table = pd.read_csv(file, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PipelineError(f"{file} is not a valid forecast table: {first_line(e)}; delete it and rerun") from None
    table = table.astype(object).where(table.notna(), math.nan)
    for text in ("timestamp", "form_weights", "measured_sizes", "best_head", "status"):
        if text in table.columns:
            table[text] = table[text].map(lambda v: "" if isinstance(v, float) and math.isnan(v) else str(v))
    return [Forecast.from_row(r, str(file)) for r in table.to_dict("records")]


def write(file: Path, records: list[Forecast]) -> None:
    """Replace the rows of the same (backbone, target size), keep the others; atomic, under the table's lock."""
    with lock.exclusive(file, announce=False):
        keep = [r for r in read(file) if (r.backbone, r.target_n) not in {(x.backbone, x.target_n) for x in records}]
        table = pd.DataFrame([r.to_row() for r in keep + records], columns=[f.name for f in fields(Forecast)])
        with atomic_path(file) as tmp:
            table.to_csv(tmp, index=False)


def band_path(artifacts: str | Path, dataset: str) -> Path:
    """The forecast curve and its interval at every size looked at: what the report plots."""
    return Path(artifacts) / "results" / f"{dataset}.forecast-band.csv"


BAND_COLUMNS = ["backbone", "n", "accuracy", "low", "high", "head", "p_beats_head"]


def write_band(file: Path, backbone: str, band: pd.DataFrame) -> None:
    with lock.exclusive(file, announce=False):
        old = read_band(file)
        new = band.assign(backbone=backbone)[BAND_COLUMNS]
        table = pd.concat([old[old["backbone"] != backbone], new], ignore_index=True) if len(old) else new
        with atomic_path(file) as tmp:
            table.to_csv(tmp, index=False)


def read_band(file: Path) -> pd.DataFrame:
    if not Path(file).exists():
        return pd.DataFrame(columns=BAND_COLUMNS)
    table = pd.read_csv(file)
    missing = [c for c in BAND_COLUMNS if c not in table.columns]
    if missing:
        raise PipelineError(f"{file}: no column(s) {', '.join(missing)}; rerun `make forecast` to rewrite it")
    return table
