"""A fine-tune's progress while it runs, kept in its work folder as ``state.json`` so that an interrupted
run resumes where it stopped: one typed record, written by the phases and read by the orchestrator."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.artifacts import write_json_atomic
from pipeline.errors import PipelineError
from pipeline.finetune.record import SearchRecord

log = logging.getLogger(__name__)

FILE = "state.json"


@dataclass(kw_only=True)
class FrozenScore:
    """Phase 1's model scored on test: the `frozen_dense` method (the Keras guide's recipe)."""

    scores: dict
    n_test: int


@dataclass(kw_only=True)
class RunState:
    """Per finished phase: its seconds, epochs run, best epoch and best val; and what the run has decided."""

    inputs_key: str  # the run's inputs: a work folder made with others is never resumed
    phase_seconds: list[float] = field(default_factory=list)
    epochs_run: list[int] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    best_val: list[float] = field(default_factory=list)
    devices: dict | None = None  # replicas, strategy and global batch
    frozen: FrozenScore | None = None
    search: SearchRecord | None = None  # phase 2's learning-rate search, as far as it went
    learning_rate_finetune: float | None = None
    stop: str | None = None  # why phase 2 ended (``search.stop_reason``)

    def end_phase(self, seconds: float, ran: int, best_epoch: int, best_val: float) -> None:
        self.phase_seconds.append(seconds)
        self.epochs_run.append(ran)
        self.best_epochs.append(best_epoch)
        self.best_val.append(best_val)

    @property
    def val_accuracy(self) -> float:
        """The last finished phase's best validation accuracy (NaN before any)."""
        return self.best_val[-1] if self.best_val else float("nan")

    def save(self, work: Path) -> None:
        write_json_atomic(work / FILE, dataclasses.asdict(self))

    @classmethod
    def start(cls, work: Path, key: str, resume: bool) -> RunState:
        """The state to go on from: the saved one under ``resume`` when it was made with these inputs, else a
        fresh one in an emptied work folder (created if need be)."""
        saved = cls._read(work / FILE) if resume else None
        if saved is not None and saved.inputs_key == key:
            return saved
        if resume and (work / FILE).exists():
            log.warning("notice: %s was started with other settings or another version; starting over", work.name)
        elif resume and work.exists():
            return cls(inputs_key=key)  # nothing run yet: keep what is there (a copied worker folder's spills)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        return cls(inputs_key=key)

    @classmethod
    def _read(cls, path: Path) -> RunState | None:
        """The saved state, None when absent or not of this layout (an older version's work folder)."""
        try:
            data = json.loads(path.read_text())
            frozen, search = data.pop("frozen", None), data.pop("search", None)
            return cls(
                **data,
                frozen=FrozenScore(**frozen) if frozen else None,
                search=SearchRecord.from_dict(search) if search else None,
            )
        except (OSError, ValueError, TypeError, AttributeError, PipelineError):  # a record of another layout
            return None
