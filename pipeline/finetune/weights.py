"""The fine-tune's weight files in its work folder, for the phases (a file's presence says a step is done)
and for early stopping's best epoch: written whole or not at all. A file carries the optimizer state it was
saved with; read into a model whose optimizer does not match it (phase 1's file into phase 2), that state
is skipped quietly. Kept free of a Keras import, so that importing the phases stays cheap."""

from __future__ import annotations

import warnings
from pathlib import Path

from pipeline.artifacts import atomic_path


def save(model, path: Path) -> None:
    """A run killed while writing resumes from the step before instead of failing on half a file."""
    with atomic_path(path, ".weights.h5") as tmp:
        model.save_weights(tmp)


def load(model, path: Path) -> None:
    with warnings.catch_warnings():  # weights saved under another optimizer: its state is not wanted back
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(path)
