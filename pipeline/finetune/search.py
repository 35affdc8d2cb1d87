"""Phase 2 of the fine-tune with the care the heads get: its learning rate chosen on the validation split,
then trained until validation says stop.

The search is one rung of successive halving: every learning rate of the grid trains ``search_epochs``
from the same phase-1 weights, the best by validation accuracy continues from where its search run ended
(so its search epochs are not trained twice), and a best value on the grid's edge extends the grid one
log step at a time, as the heads' grids do. Each search run anneals its rate to zero (cosine) over its
epochs: compared unannealed after one epoch, the smallest rate won on the demo (val 0.831 at 1e-5, 0.826
at 1e-4, 0.642 at 1e-3) because a larger rate's noise had not settled yet, the short-horizon bias of
successive halving. Every search epoch is charged to the fine-tune as tuning time, as the heads' C
searches are charged to them (Kornblith et al., CVPR 2019, tune the baseline's learning rate on validation
before comparing; Li et al., ICLR 2020: its best value depends on the dataset).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from pipeline.artifacts import write_json_atomic
from pipeline.estimators import tuning

log = logging.getLogger(__name__)

MAX_EXTENSIONS = 2  # log steps tried beyond an edge before the search gives up and says so


def weights_file(work: Path, lr: float) -> Path:
    return work / f"search-lr{lr:g}.weights.h5"


def choose_lr(
    try_lr: Callable[[float], tuple[float, float]], grid: tuple[float, ...], state: dict, work: Path
) -> float:
    """The grid's learning rate with the best validation accuracy after its search epochs. ``try_lr(lr)``
    trains one candidate and returns (val accuracy, seconds); tried values are kept in ``state`` (and its
    file), so an interrupted search resumes. A one-value grid is no search: that value, no cost."""
    values = sorted(float(v) for v in grid)
    if len(values) == 1:
        return values[0]
    search = state.setdefault("search", {})

    def run(lr: float) -> float:
        key = f"{lr:g}"
        if key not in search or not weights_file(work, lr).exists():
            acc, seconds = try_lr(lr)
            search[key] = acc
            state["search_seconds"] = state.get("search_seconds", 0.0) + seconds
            write_json_atomic(work / "state.json", state)
        return search[key]

    for lr in values:
        run(lr)
    center = math.exp(sum(math.log(v) for v in values) / len(values))

    def best_of(tried: list[float]) -> float:
        """Highest val accuracy; a tie goes to the value nearest the grid's middle (no edge chased on a tie)."""
        return max(tried, key=lambda v: (search[f"{v:g}"], -abs(math.log(v / center))))

    for _ in range(MAX_EXTENSIONS):
        tried = sorted(float(k) for k in search)
        best = best_of(tried)
        beyond = tuning.edge_values(tried, best, "learning rate", steps=1)
        if not beyond:
            break
        run(beyond[0])
    tried = sorted(float(k) for k in search)
    best = best_of(tried)
    tuning.edge_values(tried, best, "learning rate", extend=False)  # warns when still on the edge
    tried_text = ", ".join(f"{v:g}: {search[f'{v:g}']:.4f}" for v in tried)
    log.info("learning rate search (val accuracy): %s -> %g", tried_text, best)
    return best


def annealed(lr: float, steps: int):
    """A search run's rate: ``lr`` decayed to zero over its ``steps`` (cosine), so it is judged settled."""
    import keras

    return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(int(steps), 1))


def stop_reason(epochs_run: int, epochs_max: int) -> str:
    """Why phase 2 ended: validation (early stopping) or the epoch cap, which means it was still improving
    by the stopping rule's own measure (its best epoch within the last ``patience``)."""
    return "epoch_cap" if epochs_run >= epochs_max else "early_stopping"


def schedule_callback(kind: str, lr: float, epochs_max: int):
    """The phase-2 learning-rate schedule: ``plateau`` lowers it 3x when val accuracy stalls an epoch;
    ``cosine`` decays it to zero over the epoch cap; ``constant`` keeps it."""
    import keras

    if kind == "plateau":
        return keras.callbacks.ReduceLROnPlateau("val_accuracy", factor=0.3, patience=1, mode="max", min_lr=lr / 100)
    if kind == "cosine":
        return keras.callbacks.LearningRateScheduler(
            lambda epoch, _: float(lr * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs_max) / epochs_max)))
        )
    return None
