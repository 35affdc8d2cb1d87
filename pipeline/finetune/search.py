"""Phase 2 of the fine-tune with the care the heads get: its learning rate chosen on the validation split,
then trained until validation says stop.

The search is successive halving with growing budgets (Jamieson & Talwalkar 2016; Hyperband, Li et al.
2017): every rate of the grid trains rung 1 from the phase-1 weights; the rates still within the validation
noise of the best train the next rung, ``ETA`` times longer, from their own weights; it ends when one rate
leads clearly or the rungs run out. Short equal runs favour small rates (short-horizon bias: Wu, Ren, Liao
& Grosse, ICLR 2018), so a lead is trusted only beyond the noise, and a tie that survives every rung goes to
the larger rate: the smaller one only kept up while the runs were short. The chosen rate continues from its
last search run (its search epochs are not trained twice); a clearly best value on the grid's edge extends
the grid one log step at a time, as the heads' grids do. Each search run anneals its rate to zero (cosine)
over its rung, so runs are compared settled. Every search epoch is charged to the fine-tune as tuning time,
as the heads' C searches are charged to them (Kornblith et al., CVPR 2019; Li et al., ICLR 2020: the best
rate depends on the dataset, so it has to be searched).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

from pipeline.estimators import tuning
from pipeline.finetune.record import CLEAR_LEAD, TIE_TO_LARGER, SearchRecord

log = logging.getLogger(__name__)

MAX_EXTENSIONS = 2  # log steps tried beyond an edge before the search gives up and says so
ETA = 3  # each rung trains its rates this many times longer than the rung before
MIN_FIRST_RUNG_STEPS = 30  # fewer steps rank rates by how little their first steps disturbed the weights


def weights_file(work: Path, lr: float, rung: int = 1) -> Path:
    return work / f"search{'' if rung == 1 else rung}-lr{lr:g}.weights.h5"


def noise(acc: float, n_val: int) -> float:
    """The standard error of a validation accuracy over ``n_val`` images: a lead smaller than this is luck."""
    return math.sqrt(max(acc * (1 - acc), 0.0) / max(n_val, 1))


def first_rung(search_epochs: float, steps: int) -> float:
    """Rung 1's epochs: ``search_epochs``, but at least ``MIN_FIRST_RUNG_STEPS`` optimiser steps (one epoch
    where an epoch is shorter). A share of an epoch sized for a large training set leaves a small one (a
    forecast's ladder, a curve's first points) a handful of steps, after which the smallest rate leads only
    because it has moved the phase-1 weights least: the short-horizon bias at its strongest."""
    return max(search_epochs, min(1.0, MIN_FIRST_RUNG_STEPS / max(steps, 1)))


def rung_budgets(first: float, rungs: int, cap: int) -> list[float]:
    """The epochs each rung trains: ``first``, then ``ETA`` times the rung before (whole epochs from one
    epoch up), as many of ``rungs`` as keep a rate that survives them all within half the epoch cap, so
    the search never eats the run it chooses for."""
    out: list[float] = []
    for r in range(max(rungs, 1)):
        budget = first * ETA**r
        budget = float(round(budget)) if budget >= 1 else budget
        if out and sum(out) + budget > cap / 2:
            break
        out.append(min(budget, float(cap)))
    return out


def choose_lr(
    try_lr: Callable[[float, int], tuple[float, float]],
    grid: tuple[float, ...],
    record: SearchRecord,
    save: Callable[[], None],
    n_val: int,
    budgets: list[float],
) -> float:
    """The grid's learning rate that trains best on validation. ``try_lr(lr, rung)`` trains one candidate
    for ``budgets[rung - 1]`` epochs (rung 1 from the phase-1 weights, a later rung from its own weights of
    the rung before) and returns (val accuracy, seconds). What was tried is kept in ``record`` (``save()``
    writes it), so an interrupted search resumes without training anything twice. A one-value grid is no
    search: that value, no cost."""
    values = sorted(float(v) for v in grid)
    if len(values) == 1:
        record.chosen = values[0]
        return values[0]
    _rung(record, 1, budgets)
    for lr in values:
        _run(try_lr, lr, 1, record, save)
    _extend_edge(try_lr, record, save, n_val)
    contenders = _within_noise(record.rungs[0], n_val)
    log.info("learning rate search, rung 1 (val accuracy): %s", _text(record.rungs[0]))
    rung = 1
    while len(contenders) > 1 and rung < len(budgets):
        rung += 1
        log.info(
            "  no clear lead (noise %.1f pt): rung %d, %g epoch(s) each for %s",
            100 * noise(max(record.rungs[rung - 2].values()), n_val),
            rung,
            budgets[rung - 1],
            ", ".join(f"{v:g}" for v in contenders),
        )
        _rung(record, rung, budgets)
        for lr in contenders:
            _run(try_lr, lr, rung, record, save)
        log.info("learning rate search, rung %d (val accuracy): %s", rung, _text(record.rungs[rung - 1]))
        contenders = _within_noise(record.rungs[rung - 1], n_val)
    record.chosen = max(contenders)
    record.decided = CLEAR_LEAD if len(contenders) == 1 else TIE_TO_LARGER
    record.within_noise = len(contenders) > 1
    if record.within_noise:
        log.warning(
            "warning: the learning-rate search ended in a tie within the validation noise after %d rung(s) "
            "(%s); it takes the larger rate, %g: short runs favour small rates. A longer --search-epochs "
            "or more --search-rungs would choose more surely",
            rung,
            ", ".join(f"{v:g}" for v in contenders),
            record.chosen,
        )
    save()
    log.info("learning rate search -> %g (%s)", record.chosen, record.decided)
    return record.chosen


def _rung(record: SearchRecord, rung: int, budgets: list[float]) -> None:
    while len(record.rungs) < rung:
        record.rungs.append({})
        record.rung_epochs.append(budgets[len(record.rungs) - 1])


def _extend_edge(try_lr, record: SearchRecord, save, n_val: int) -> None:
    """A rate on the grid's edge that leads rung 1 clearly: try one log step beyond, at most twice."""
    first = record.rungs[0]
    for _ in range(MAX_EXTENSIONS):
        contenders = _within_noise(first, n_val)
        if len(contenders) > 1:
            return
        beyond = tuning.edge_values(sorted(float(k) for k in first), contenders[0], "learning rate", steps=1)
        if not beyond:
            return
        _run(try_lr, beyond[0], 1, record, save)
    contenders = _within_noise(first, n_val)
    if len(contenders) == 1:
        tuning.edge_values(sorted(float(k) for k in first), contenders[0], "learning rate", extend=False)


def _within_noise(scores: dict[str, float], n_val: int) -> list[float]:
    """The rates whose val accuracy is within the validation noise of the best's (the best included)."""
    top = max(scores.values())
    return sorted(float(k) for k, acc in scores.items() if acc >= top - noise(top, n_val))


def _run(try_lr, lr: float, rung: int, record: SearchRecord, save) -> float:
    scores, key = record.rungs[rung - 1], f"{lr:g}"
    if key not in scores:
        acc, seconds = try_lr(lr, rung)
        scores[key] = float(acc)
        record.seconds += seconds
        save()
    return scores[key]


def _text(scores: dict) -> str:
    return ", ".join(f"{v:g}: {scores[f'{v:g}']:.4f}" for v in sorted(float(k) for k in scores))


def outcome(record: SearchRecord, work: Path, lr: float) -> tuple[Path, float, float]:
    """The chosen rate's last search run: its weights, its val accuracy, and the epochs it has trained over
    all its rungs (where its final run takes up)."""
    key = f"{lr:g}"
    rungs = [r for r, scores in enumerate(record.rungs, 1) if key in scores]
    last = rungs[-1]
    epochs = sum(record.rung_epochs[r - 1] for r in rungs)
    return weights_file(work, lr, last), record.rungs[last - 1][key], epochs


def check_final(record: SearchRecord, final_val: float) -> None:
    """Compare the chosen rate's final val with every other rate's search val, and warn when the search's
    own evidence says it chose wrong."""
    record.compare_final(final_val)
    if record.beaten_by:
        log.warning(
            "warning: the fine-tune's final val %.4f is below what %s reached in the search; the search may have "
            "chosen wrong: try --lr-grid %s",
            final_val,
            ", ".join(f"{k} ({v:.4f})" for k, v in record.beaten_by.items()),
            max(record.beaten_by, key=record.beaten_by.get),
        )


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
