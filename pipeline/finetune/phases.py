"""The two ``model.fit`` phases of a fine-tune, each resumable: (1) backbone frozen, new head trained; (2)
every backbone layer trainable (BatchNorm excepted), its learning rate searched on validation, trained
until early stopping with a learning-rate schedule (``search``)."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backbones, resources
from pipeline.finetune import inputs, search
from pipeline.finetune.job import Job
from pipeline.finetune.model import build_model, optimizer_named, set_trainable
from pipeline.finetune.record import SearchRecord
from pipeline.finetune.state import RunState
from pipeline.finetune.weights import load as load_weights
from pipeline.finetune.weights import save as save_weights

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_end_of_data():
    """tf.data of unknown length (unreadable files are skipped): Keras learns the end by running out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


def fit_phase(
    model, phase: int, epochs: int, train, val, ft, work: Path, *, tag: str = "", extra=(), initial=0, steps=None
):
    """One compiled model.fit with the phase's callbacks (``extra``: the schedule), from epoch ``initial``,
    ``steps`` batches an epoch (default: ``--steps-per-epoch``, else all); returns (seconds, epochs run in
    this fit, the epoch kept (1-based, counted from 0), its val accuracy), a resumed fit's earlier epochs
    included."""
    import keras

    from pipeline.finetune.progress import ResumableEarlyStopping

    name = tag or f"phase{phase}"
    stopping = ResumableEarlyStopping(work / f"epochs-{name}", ft.patience)
    callbacks = [
        stopping,
        keras.callbacks.CSVLogger(work / "training_log.csv", append=True),
        keras.callbacks.BackupAndRestore(work / f"backup-{name}", double_checkpoint=True),  # a kill mid-write
        *[c for c in extra if c is not None],
    ]
    if ft.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(Path(ft.tensorboard) / name))
    t0 = time.perf_counter()
    with quiet_end_of_data():
        model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            initial_epoch=initial,
            steps_per_epoch=steps or ft.steps_per_epoch,
            callbacks=callbacks,
            verbose=2,
            shuffle=False,  # the tf.data pipeline shuffles; this only silences Keras' warning
        )
    done = stopping.summary(initial)  # every epoch of this fit, before and after a kill
    return time.perf_counter() - t0 + done.earlier_seconds, done.ran, done.best_epoch, done.best_val


def splits(job: Job, work: Path, batch: int, dist: Workers | None = None):
    """Training (shuffled afresh each epoch by the job's seed) and validation batches of ``batch`` images (the
    global batch: per device x devices), decoded once. Under ``dist`` each worker decodes only its shard of
    each split (every ``workers``-th image from its index), padded with weight-0 repeats to the largest
    shard, so that all run the same steps; the strategy hands each worker's batches to its replica."""
    ft = job.cfg.finetune
    budget = resources.parse(ft.memory_budget, default_fraction=0.5)
    out = []
    for name in ("train", "val"):
        part = job.ds.splits[name]
        pick = np.arange(dist.index, len(part), dist.workers) if dist else np.arange(len(part))
        every = job.ds.paths(name)  # listed once: it builds a new list on each call
        paths = [every[i] for i in pick]
        dec = inputs.decode(paths, part.labels[pick], job.size, budget, work / f"{name}.decoded.npy")
        budget -= 0 if dec.spilled else inputs.nbytes(len(pick), job.size)
        if len(dec) < len(pick):
            log.warning("warning: %d unreadable %s images left out", len(pick) - len(dec), name)
        seed = (job.seed + (dist.index if dist else 0)) if name == "train" else None
        if dist:
            longest = -(-len(part) // dist.workers)
            local = inputs.batches(dec, ft.batch_size, seed, pad_to=longest)
            out.append(dist.strategy.distribute_datasets_from_function(lambda _, ds=local: ds))
            dist.example = dist.example or next(iter(local))
            n = longest
        else:
            out.append(inputs.batches(dec, batch, seed))
            n = len(dec)
        if name == "train":
            steps = ft.steps_per_epoch or -(-n // (ft.batch_size if dist else batch))
    return out, steps


@dataclass
class Workers:
    """This process's place among the ``finetune --engine ray`` workers (``workers.py``)."""

    strategy: object  # tf.distribute.MultiWorkerMirroredStrategy, made before any other TensorFlow op
    index: int
    workers: int
    example: tuple | None = None  # one local batch, to build the model from (``workers.patch_keras``)


class Trainer:
    """Both phases of one fine-tune, driven from above: construct (the network is built and the images
    decoded), then ``phase_one()``, then ``phase_two()``. Progress is in attributes: ``model``, ``gpu`` and
    ``state`` (saved to the work folder after every step, so a killed run resumes: a finished phase's
    weights are reloaded, an interrupted one continues from its last epoch). ``dist``: this process is one
    of several Ray workers."""

    def __init__(self, job: Job, work: Path, state: RunState, dist: Workers | None = None):
        import keras

        ft = job.cfg.finetune
        if dist:
            self.strategy, replicas = dist.strategy, dist.strategy.num_replicas_in_sync
            how = f"MultiWorkerMirroredStrategy over {dist.workers} Ray workers"
        else:
            self.strategy, replicas, how = backbones.strategy(ft.devices)
        batch = ft.batch_size * replicas  # the global batch: per device x devices
        with backbones.device_policy(job.cfg.backbone.mixed_precision) as gpu, self.strategy.scope():
            self.base = backbones.build_backbone(job.spec, job.weights, job.size, job.seed)
            keras.utils.set_random_seed(job.seed)
            self.model = build_model(self.base, job.spec, len(job.ds.class_names), ft.augment, job.seed, ft.dropout)
        self.job, self.work, self.state, self.gpu = job, work, state, gpu
        workers = dist.workers if dist else 1
        state.devices = {"replicas": replicas, "strategy": how, "global_batch": batch, "workers": workers}
        log.info(
            "fine-tuning %s on %s (%s, %dpx) on %s (%s, global batch %d): %d epochs (head), then up to %d (all of it)",
            job.spec.name, job.ds.summary(), job.weights.describe(), job.size, "GPU" if gpu else "CPU", how, batch,
            ft.epochs_head, ft.epochs_finetune,
        )  # fmt: skip
        self.data, self.steps = splits(job, work, batch, dist)
        if dist:
            from pipeline.finetune.workers import patch_keras

            patch_keras(self.model, dist.example)

    def phase_one(self) -> None:
        """The new head on the frozen backbone (skipped when already done, or with no head epochs)."""
        with self.strategy.scope():  # the optimizers (compiled per phase and per searched rate) are built under it
            _phase_one(self.job, self.model, self.base, self.data, self.work, self.state)

    def phase_two(self) -> None:
        """Every backbone layer: the learning-rate search, then the chosen rate to early stopping."""
        with self.strategy.scope():
            _phase_two(self.job, self.model, self.base, self.data, self.steps, self.work, self.state)


def _done(model, path: Path, phase: int) -> bool:
    if not path.exists():
        return False
    load_weights(model, path)
    log.info("phase %d already done (resumed from %s)", phase, path.name)
    return True


def _compile(model, ft, lr: float) -> None:
    """A fresh optimizer at ``lr``: each phase starts clean."""
    model.compile(optimizer_named(ft.optimizer, lr), "sparse_categorical_crossentropy", metrics=["accuracy"])


def compile_once(model, ft, lr: float) -> Callable[[float], None]:
    """Phase 2's one compile, shared by every searched rate and the final run: a compile drops the traced
    training and validation steps, and tracing them again costs seconds of CPU every run. Returns
    ``restart(lr)``, which puts the optimizer back to its state before any step (iterations, moments), at
    rate ``lr``: what a fresh compile gave each run. Call it after loading a weights file, which brings
    back the optimizer state it was saved with."""
    _compile(model, ft, lr)
    opt = model.optimizer
    opt.build(model.trainable_variables)
    fresh = [_uniform_or_all(np.array(v)) for v in opt.variables]

    def restart(rate: float) -> None:
        for variable, value in zip(opt.variables, fresh):
            variable.assign(np.full(variable.shape, value, variable.dtype) if np.ndim(value) == 0 else value)
        opt.learning_rate = rate

    return restart


def _uniform_or_all(value: np.ndarray):
    """An array of one repeated value (Adam's zero moments: twice the model's size) kept as that value."""
    return value.flat[0] if value.size and (value == value.flat[0]).all() else value


def _phase_one(job: Job, model, base, data, work: Path, state: RunState) -> None:
    ft = job.cfg.finetune
    set_trainable(base, 1, ft.unfreeze_layers)
    _compile(model, ft, ft.learning_rate)
    done = work / "phase1.done.weights.h5"
    if not _done(model, done, 1) and ft.epochs_head > 0:
        log.info("phase 1: backbone frozen, learning rate %g", ft.learning_rate)
        state.end_phase(*fit_phase(model, 1, ft.epochs_head, *data, ft, work))
        state.save(work)
        save_weights(model, done)


def _search_rate(job: Job, model, data, steps: int, work: Path, state: RunState, restart) -> float:
    """Phase 2's learning rate (``search.choose_lr``): each candidate's rung trained here from the phase-1
    weights or its own rung before, annealed over its budget (below one epoch: that share of an epoch's
    shuffled batches), its weights and the record kept in the work folder so a kill resumes the search."""
    ft = job.cfg.finetune
    start = work / "phase2.start.weights.h5"
    budgets = search.rung_budgets(search.first_rung(ft.search_epochs, steps), ft.search_rungs, ft.epochs_finetune)

    record = state.search

    def save() -> None:
        state.save(work)

    def try_lr(lr: float, rung: int) -> tuple[float, float]:
        load_weights(model, start if rung == 1 else search.weights_file(work, lr, rung - 1))
        restart(lr)
        budget = budgets[rung - 1]
        log.info("phase 2 search: learning rate %g, %g epoch(s), rung %d", lr, budget, rung)
        epochs, part = (1, max(1, round(budget * steps))) if budget < 1 else (int(budget), None)
        tag = search.weights_file(work, lr, rung).name.removesuffix(".weights.h5")
        anneal = search.annealing(lr, epochs * (part or steps))
        seconds, _, _, best_val = fit_phase(model, 2, epochs, *data, ft, work, tag=tag, steps=part, extra=[anneal])
        save_weights(model, search.weights_file(work, lr, rung))  # its best epoch's (early stopping restores them)
        return best_val, seconds

    return search.choose_lr(try_lr, ft.lr_grid, record, save, len(job.ds.splits["val"]), budgets)


def _phase_two(job: Job, model, base, data, steps: int, work: Path, state: RunState) -> None:
    """The learning-rate search from the phase-1 weights, then the best value trained on to early stopping.
    ``steps``: training steps per epoch, over which each search run anneals its rate."""
    ft = job.cfg.finetune
    n = set_trainable(base, 2, ft.unfreeze_layers)
    done = work / "phase2.done.weights.h5"
    if _done(model, done, 2) or ft.epochs_finetune <= 0:
        return
    what = "every" if ft.unfreeze_layers < 0 else f"the top {n}"
    log.info("phase 2: %s backbone layer with weights trainable (%d), BatchNorm in inference mode", what, n)
    start = work / "phase2.start.weights.h5"
    if not start.exists():
        save_weights(model, start)
    restart = compile_once(model, ft, float(ft.lr_grid[0]))
    searched = len(ft.lr_grid) > 1
    state.search = state.search or SearchRecord()
    lr = _search_rate(job, model, data, steps, work, state, restart)
    weights, search_val, initial = start, 0.0, 0
    if searched:
        weights, search_val, trained = search.outcome(state.search, work, lr)
        initial = max(1, round(trained))
    load_weights(model, weights)
    restart(lr)
    log.info("phase 2: learning rate %g (%s schedule), up to %d epochs", lr, ft.schedule, ft.epochs_finetune)
    seconds, ran, best_epoch, best_val = 0.0, 0, initial, -1.0  # a search that used up the cap trains no more
    if initial < ft.epochs_finetune:
        seconds, ran, best_epoch, best_val = fit_phase(
            model,
            2,
            ft.epochs_finetune,
            *data,
            ft,
            work,
            extra=[search.schedule_callback(ft.schedule, lr, ft.epochs_finetune)],
            initial=initial,
        )
    if searched and search_val > best_val:  # nothing after the search runs beat them: keep that
        load_weights(model, weights)
        best_epoch, best_val = initial, search_val
    if searched:
        search.check_final(state.search, best_val)
    else:
        state.search = None
    state.learning_rate_finetune = lr
    state.stop = search.stop_reason(initial + ran, ft.epochs_finetune)
    state.end_phase(seconds, initial + ran, best_epoch, best_val)
    state.save(work)
    save_weights(model, done)
