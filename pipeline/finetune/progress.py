"""Early stopping that survives a kill. ``BackupAndRestore`` resumes an interrupted ``model.fit`` at its
last finished epoch, but Keras' ``EarlyStopping`` and ``History`` start over: patience would count from
the resume, a best epoch before the kill would be forgotten (its weights too), and the fit's record would
hold only the epochs after it. This callback writes every epoch (val accuracy, seconds) to a JSON file and
the best epoch's weights beside it, and takes both up again when the same fit resumes."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.artifacts import write_json_atomic
from pipeline.finetune import weights


@dataclass(frozen=True)
class Summary:
    """A fit across all its resumes: epochs run, the best one (1-based, counting from 0), its val
    accuracy, and the seconds of the epochs finished before this resume."""

    ran: int
    best_epoch: int
    best_val: float
    earlier_seconds: float


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping("val_accuracy", restore_best_weights=True)`` whose state lives in ``<stem>.json``
    and ``<stem>.best.weights.h5``, so that a resumed fit stops, and restores, as an unbroken one would."""

    def __init__(self, stem: Path, patience: int):
        super().__init__("val_accuracy", patience=patience, mode="max")
        self.log_path = stem.with_name(stem.name + ".json")
        self.best_path = stem.with_name(stem.name + ".best.weights.h5")
        self.epochs: list[dict] = json.loads(self.log_path.read_text()) if self.log_path.exists() else []
        self.resumed_at: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.resumed_at is None:  # the fit's first epoch: forget what a kill left unfinished, take up the rest
            self.resumed_at = epoch
            self.epochs = [e for e in self.epochs if e["epoch"] < epoch]
            best = _best(self.epochs)
            if best:
                self.best, self.best_epoch = best["val_accuracy"], best["epoch"]
                self.wait = epoch - 1 - best["epoch"]
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        current = (logs or {}).get(self.monitor)
        if current is not None and self.best_epoch == epoch:
            weights.save(self.model, self.best_path)
        val = float("nan") if current is None else float(current)
        self.epochs.append({"epoch": epoch, "val_accuracy": val, "seconds": time.perf_counter() - self._t0})
        write_json_atomic(self.log_path, self.epochs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        last = self.epochs[-1]["epoch"] if self.epochs else None
        if self.epochs and self.best_epoch != last and self.best_path.exists():
            weights.load(self.model, self.best_path)

    def summary(self, initial: int) -> Summary:
        """This fit from epoch ``initial``: every epoch it ran, before and after any kill."""
        if not self.epochs:
            return Summary(0, initial + 1, float("nan"), 0.0)
        best = _best(self.epochs) or {"epoch": initial, "val_accuracy": float("nan")}
        earlier = sum(e["seconds"] for e in self.epochs if e["epoch"] < (self.resumed_at or 0))
        return Summary(self.epochs[-1]["epoch"] + 1 - initial, best["epoch"] + 1, best["val_accuracy"], earlier)


def _best(epochs: list[dict]) -> dict | None:
    """The first epoch with the highest val accuracy (as EarlyStopping keeps it), None if none has one."""
    scored = [e for e in epochs if math.isfinite(e["val_accuracy"])]
    return max(scored, key=lambda e: e["val_accuracy"]) if scored else None
