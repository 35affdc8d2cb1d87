"""Phase 2 of the fine-tune with the care the heads get: its learning rate chosen on the validation split,
then trained until validation says stop.

The search is successive halving: every learning rate of the grid trains ``search_epochs`` from the same
phase-1 weights; when no value leads by more than the validation noise, the values within the noise of
the best train a second rung; the best continues from where its search runs ended (so its search epochs
are not trained twice), and a clearly best value on the grid's edge extends the grid one log step at a
time, as the heads' grids do. Each search run anneals its rate to zero (cosine) over its
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


def weights_file(work: Path, lr: float, rung: int = 1) -> Path:
    return work / f"search{'' if rung == 1 else rung}-lr{lr:g}.weights.h5"


def noise(acc: float, n_val: int) -> float:
    """The standard error of a validation accuracy over ``n_val`` images: a lead smaller than this is luck."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / max(n_val, 1))


def choose_lr(
    try_lr: Callable[[float, int], tuple[float, float]], grid: tuple[float, ...], state: dict, work: Path, n_val: int
) -> float:
    """The grid's learning rate with the best validation accuracy after its search epochs. ``try_lr(lr, rung)``
    trains one candidate (rung 1 from the phase-1 weights, rung 2 from its rung-1 weights) and returns (val
    accuracy, seconds); tried values are kept in ``state`` (and its file), so an interrupted search resumes.
    A one-value grid is no search: that value, no cost.

    A lead within the validation noise (``noise``) decides nothing: an edge is extended only when the edge
    value leads clearly, and when the leader is not clear every value within the noise of it trains one more
    rung of the same length, which decides. On the demo a third of an epoch ranked 1e-5 / 1e-4 within 0.3 pt
    (noise: 1.3 pt) and, at twice the global batch on two workers, picked 1e-6; one whole epoch separated
    them by 4 pt."""
    values = sorted(float(v) for v in grid)
    if len(values) == 1:
        return values[0]
    rung1 = state.setdefault("search", {})
    for lr in values:
        _run(try_lr, lr, 1, state, work)
    center = math.exp(sum(math.log(v) for v in values) / len(values))

    def best_of(scores: dict) -> float:
        """Highest val accuracy; a tie goes to the value nearest the grid's middle (no edge chased on a tie)."""
        return max((float(k) for k in scores), key=lambda v: (scores[f"{v:g}"], -abs(math.log(v / center))))

    for _ in range(MAX_EXTENSIONS):
        tried = sorted(float(k) for k in rung1)
        best = best_of(rung1)
        beyond = tuning.edge_values(tried, best, "learning rate", steps=1) if _clear(rung1, best, n_val) else []
        if not beyond:
            break
        _run(try_lr, beyond[0], 1, state, work)
    best = best_of(rung1)
    tuning.edge_values(sorted(float(k) for k in rung1), best, "learning rate", extend=False)  # still on an edge?
    log.info("learning rate search (val accuracy): %s -> %g", _text(rung1), best)
    if _clear(rung1, best, n_val):
        return best
    margin = noise(rung1[f"{best:g}"], n_val)
    contenders = [float(k) for k, acc in rung1.items() if acc >= rung1[f"{best:g}"] - margin]
    state.setdefault("search_rung2", {})
    for lr in sorted(contenders):
        _run(try_lr, lr, 2, state, work)
    rung2 = state["search_rung2"]
    best = best_of(rung2)
    log.info("  no clear lead (noise %.1f pt): second rung (val accuracy): %s -> %g", 100 * margin, _text(rung2), best)
    state["search_within_noise"] = not _clear(rung2, best, n_val)  # the report says so beside the chosen rate
    if state["search_within_noise"]:
        log.warning(
            "warning: the learning-rate search's leader %g is still within the validation noise after two rungs; "
            "a longer --search-epochs would choose more surely",
            best,
        )
    return best


def _run(try_lr, lr: float, rung: int, state: dict, work: Path) -> float:
    scores, key = state[_RUNGS[rung]], f"{lr:g}"
    if key not in scores or not weights_file(work, lr, rung).exists():
        acc, seconds = try_lr(lr, rung)
        scores[key] = acc
        state["search_seconds"] = state.get("search_seconds", 0.0) + seconds
        write_json_atomic(work / "state.json", state)
    return scores[key]


_RUNGS = {1: "search", 2: "search_rung2"}


def _clear(scores: dict, best: float, n_val: int) -> bool:
    """``best`` leads every other value by more than the validation noise."""
    top = scores[f"{best:g}"]
    others = [acc for k, acc in scores.items() if k != f"{best:g}"]
    return not others or top - max(others) > noise(top, n_val)


def _text(scores: dict) -> str:
    return ", ".join(f"{v:g}: {scores[f'{v:g}']:.4f}" for v in sorted(float(k) for k in scores))


def outcome(state: dict, work: Path, lr: float) -> tuple[Path, float, int]:
    """The chosen rate's last search run: its weights, its val accuracy and how many rungs it trained."""
    rung = 2 if f"{lr:g}" in state.get("search_rung2", {}) else 1
    return weights_file(work, lr, rung), state[_RUNGS[rung]][f"{lr:g}"], rung


def annealing(lr: float, steps: int):
    """A search run's rate: ``lr`` decayed to zero over its ``steps`` (cosine), so it is judged settled. The
    values of ``keras.optimizers.schedules.CosineDecay(lr, steps)``, set before each batch from the
    optimizer's own step count (so a resumed run takes it up where it stopped) on the one optimizer phase 2
    compiles: a schedule compiled in would need a compile, and a retrace, per searched rate."""
    import keras

    steps = max(int(steps), 1)

    class Anneal(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            opt = self.model.optimizer
            step = min(int(keras.ops.convert_to_numpy(opt.iterations)), steps)
            opt.learning_rate = lr * 0.5 * (1 + math.cos(math.pi * step / steps))

    return Anneal()


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
