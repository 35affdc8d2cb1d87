"""The learning-rate search's record: kept in the fine-tune's work folder while it runs (so an interrupted
search resumes), written into the results row's params, and read back by the report through this same
type, so writer and reader cannot drift apart by a renamed key."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

PARAMS_KEY = "lr_search"  # where the record sits in a `finetune` row's params

TIE_TO_LARGER = "tie, to the larger rate"
CLEAR_LEAD = "clear lead"


@dataclass
class SearchRecord:
    """What the search tried and why it chose. Rates are keyed by their ``%g`` text, as in the log."""

    rungs: list[dict[str, float]] = field(default_factory=list)  # per rung: each rate it trained -> its val
    rung_epochs: list[float] = field(default_factory=list)  # per rung: epochs each of its rates trained
    seconds: float = 0.0  # every search run, charged to the fine-tune as tuning time
    chosen: float | None = None
    decided: str = ""  # CLEAR_LEAD or TIE_TO_LARGER ("" before it ends, or with one rate: no search)
    within_noise: bool = False  # the last rung's leader was still inside the validation noise
    final_val: float | None = None  # the chosen rate's run at its end
    beaten_by: dict[str, float] = field(default_factory=dict)  # rates whose search val beat that final val

    def best_search_val(self, rate: str) -> float:
        """The highest validation accuracy ``rate`` reached in any rung of the search."""
        return max((r[rate] for r in self.rungs if rate in r), default=float("-inf"))

    def compare_final(self, final_val: float) -> None:
        """Keep the chosen run's final val and name every other rate whose search already did better: the
        search's evidence then contradicts its choice, and the verdict says so."""
        self.final_val = float(final_val)
        chosen = f"{self.chosen:g}" if self.chosen is not None else None
        tried = {rate for rung in self.rungs for rate in rung if rate != chosen}
        reached = {rate: self.best_search_val(rate) for rate in sorted(tried)}
        self.beaten_by = {rate: round(val, 4) for rate, val in reached.items() if val > final_val}

    def to_params(self) -> dict:
        out = dataclasses.asdict(self)
        out["rungs"] = [{k: round(v, 4) for k, v in rung.items()} for rung in self.rungs]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> SearchRecord:
        """A record as ``to_params`` wrote it; an unknown or missing field is an error, not a silent default."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(data) - names, names - set(data)
        if unknown or missing:
            raise PipelineError(
                f"a fine-tune's learning-rate search record has unknown {sorted(unknown)}, missing {sorted(missing)} "
                "fields: it was written by another version of the pipeline; rerun `finetune --force`"
            )
        return cls(**data)

    @classmethod
    def from_params(cls, params: dict) -> SearchRecord | None:
        """The record in a `finetune` row's params, None when the run searched nothing. Rows written before
        this record existed (a flat dict of rung-1 vals, ``lr_search_rung2``, ``lr_search_within_noise``)
        read as the same record."""
        found = params.get(PARAMS_KEY)
        if not found:
            return None
        if "rungs" in found:
            return cls.from_dict(found)
        rungs = [dict(found)] + ([dict(params["lr_search_rung2"])] if params.get("lr_search_rung2") else [])
        return cls(
            rungs=rungs,
            chosen=params.get("learning_rate_finetune"),
            within_noise=bool(params.get("lr_search_within_noise", False)),
            seconds=float(params.get("search_seconds") or 0.0),
        )


PARAMS_VERSION = 2  # rows without a version were written before this record: read leniently, as they are
_LEGACY = ("lr_search_rung2", "lr_search_within_noise")  # keys of the search's older flat layout


@dataclass(frozen=True)
class FinetuneParams:
    """What a `finetune` results row's ``params`` hold: written by the fine-tune, read by the report and the
    forecast through this one type (a row of this version with a renamed or missing field is an error)."""

    epochs: list[int]  # planned: phase 1, then the phase-2 cap
    epochs_run: list[int]
    best_epochs: list[int]
    stop: str | None  # "early_stopping" or "epoch_cap"
    unfreeze_layers: int
    learning_rate: float  # phase 1
    learning_rate_finetune: float | None  # phase 2, searched or given
    search: SearchRecord | None
    search_epochs: float
    search_seconds: float
    schedule: str
    devices: dict | None  # replicas, strategy and global batch: what the seconds bought
    phase_seconds: list[float]

    @property
    def capped(self) -> bool:
        """Phase 2 ran to its epoch cap: by the stopping rule it was still improving."""
        return self.stop == "epoch_cap"

    @property
    def replicas(self) -> int:
        return int((self.devices or {}).get("replicas") or 1)

    def to_params(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "search"}
        out[PARAMS_KEY] = self.search.to_params() if self.search is not None else None
        return {**out, "version": PARAMS_VERSION}

    @classmethod
    def from_params(cls, params: dict) -> FinetuneParams:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "search"]
        if params.get("version") == PARAMS_VERSION:
            known = {*names, PARAMS_KEY, "version"}
            unknown, missing = sorted(set(params) - known), sorted(known - set(params))
            if unknown or missing:
                raise PipelineError(
                    f"a fine-tune's params have unknown {unknown}, missing {missing} fields: written by another "
                    "version of the pipeline; rerun `finetune --force`"
                )
        elif params.get("version") is not None:
            raise PipelineError(f"a fine-tune's params are of version {params['version']}, not {PARAMS_VERSION}")
        defaults = {"epochs": [], "epochs_run": [], "best_epochs": [], "stop": None, "unfreeze_layers": -1,
                    "learning_rate": 0.0, "learning_rate_finetune": None, "search_epochs": 0.0,
                    "search_seconds": 0.0, "schedule": "", "devices": None, "phase_seconds": []}  # fmt: skip
        values = {k: params.get(k, defaults[k]) for k in names}
        return cls(**values, search=SearchRecord.from_params(params))
