"""Training, scoring and saving a fine-tune: two ``model.fit`` phases with callbacks (early stopping,
checkpoints, backup-and-restore for resume), one test pass, the `finetune` and `frozen_dense` rows."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import backbones, results, uptodate
from pipeline.artifacts import atomic_path, run_record, writable_dir, write_json_atomic
from pipeline.config import Config
from pipeline.data import Dataset, from_config, image_dataset, nested_subset
from pipeline.data.augment import AUGMENT_SEEDS
from pipeline.finetune import phases
from pipeline.finetune.job import Job, model_path
from pipeline.finetune.record import FinetuneParams
from pipeline.finetune.state import FrozenScore, RunState

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model_path: Path
    val_accuracy: float
    scores: dict
    phase_seconds: list[float]
    epochs_run: list[int]
    search_seconds: float = 0.0  # the learning-rate search, charged like the heads' tuning

    @property
    def train_seconds(self) -> float:
        return float(sum(self.phase_seconds) + self.search_seconds)


def _predict(model, ds: Dataset, split: str, size: int, batch_size: int):
    """(ids, y_true, y_pred) of one split; unreadable images are left out (and said so). The forward pass is
    traced once: called eagerly, batch by batch, it takes several times as long (benchmarks/NOTES.md)."""
    import tensorflow as tf

    forward = tf.function(
        lambda x: model(x, training=False), input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)]
    )
    part = ds.splits[split]
    pred, index = [], []
    for images, idx in image_dataset(ds.paths(split), size, batch_size):  # carries each image's position
        pred.append(np.argmax(forward(images), axis=1))
        index.append(idx.numpy())
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    if len(index) < len(part):
        log.warning("warning: %d unreadable %s images left out of the score", len(part) - len(index), split)
    y_pred = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    return [part.ids[i] for i in index], part.labels[index], y_pred


def _inputs_key(cfg: Config, ds: Dataset, spec, weights, size: int, extra_seed: int | None = None) -> str:
    skip = ("resume", "tensorboard", "seeds", "memory_budget", "engine", "workers")  # how a run is driven
    settings = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in skip}
    if cfg.finetune.engine == "ray" and cfg.finetune.workers > 1:  # the global batch is per worker x workers
        settings["workers"] = cfg.finetune.workers
    extra = {"train_seed": extra_seed} if extra_seed is not None else {}
    return uptodate.inputs_key(
        **extra,
        stage="finetune",
        dataset=ds.fingerprint(),
        classes=ds.class_names,
        backbone=spec.name,
        preprocessing=spec.preprocessing,
        weights=weights.source,
        weights_sha256=weights.sha256,
        input_size=size,
        finetune=settings,
        seed=cfg.data.seed,
        augment_seeds=AUGMENT_SEEDS,
        precision=backbones.compute_precision(cfg.backbone.mixed_precision),
    )


def run(cfg: Config, dataset: Dataset | None = None, n_subset: int | None = None) -> FinetuneResult:
    """Fine-tune, evaluate once on test, save the model and `finetune` + `frozen_dense` results rows; with
    ``--seeds N``, N-1 more times with training seeds seed+1, ... (same data), each its own rows.

    ``n_subset``: train on a nested stratified subset of that many training images (learning curve);
    its artifacts get a ``-n<N>`` suffix. A result whose inputs match a saved one is reused. With
    ``--engine ray`` the training runs on ``--workers`` Ray workers (``workers.py``)."""
    job = _job(cfg, dataset, n_subset)
    first = _fine_tune(job, n_subset)
    for k in range(1, max(cfg.finetune.seeds, 1)):
        log.info("fine-tune seed %d of %d: training seed %d", k + 1, cfg.finetune.seeds, cfg.data.seed + k)
        _fine_tune(job.with_seed(cfg.data.seed + k), n_subset, cfg.data.seed + k)
    return first


def _fine_tune(job: Job, n_subset: int | None, seed: int | None = None) -> FinetuneResult:
    """One training seed: the saved result when up to date, else trained here or on Ray workers."""
    reused = _reused(job)
    if reused is not None:
        return reused
    if job.cfg.finetune.engine == "ray" and job.cfg.finetune.workers > 1:
        from pipeline.finetune import workers

        return workers.run(job.cfg, job.work, run_as_worker, job.cfg, n_subset, seed)
    return _train_and_save(job)


def run_as_worker(cfg: Config, n_subset: int | None, seed: int | None, strategy, index: int, n: int):
    """One Ray worker's share of a fine-tune. Every worker runs every step the chief runs, scoring and saving
    included (reading a variable the strategy reduces is a collective: all must take part), the others into
    their own work folders; the chief (index 0) alone writes the model, the predictions, the record and the
    results rows. Returns the chief's ``FinetuneResult`` (None on the others)."""
    job = _job(cfg, None, n_subset)
    job = job if seed is None else job.with_seed(seed)
    from pipeline.finetune.workers import worker_dir

    dist = phases.Workers(strategy, index, n)
    return _train_and_save(job, dist, worker_dir(job.work, index))


def _reused(job: Job) -> FinetuneResult | None:
    """The saved result when its inputs match this job's and its files are all there (rows re-filed)."""
    cfg = job.cfg
    saved = uptodate.reusable(job.stem.with_suffix(".json"), _key(job), *_files(job), force=cfg.force)
    if saved is None:
        return None
    for row in saved["rows"]:
        results.upsert(results.results_path(cfg.artifacts, cfg.dataset_name), row)
    print(f"\nfinetune {job.spec.name} ({job.ds.summary()}): up to date, reused {job.out} (--force to redo)")
    return FinetuneResult(
        job.out,
        saved["val_accuracy"],
        saved["scores"],
        saved["phase_seconds"],
        saved["epochs_run"],
        saved.get("search_seconds", 0.0),
    )


def _key(job: Job) -> str:
    return _inputs_key(job.cfg, job.ds, job.spec, job.weights, job.size, job.extra_seed)


def _files(job: Job) -> list[Path]:
    frozen = [_pred(job.frozen_stem), job.frozen_stem.with_suffix(".keras")] if job.cfg.finetune.epochs_head > 0 else []
    return [job.out, _pred(job.stem)] + frozen


def _train_and_save(job: Job, dist: phases.Workers | None = None, work: Path | None = None) -> FinetuneResult | None:
    """One training seed, trained here (or as one of several Ray workers); the result on the chief, None on
    the other workers, which write nothing of their own."""
    cfg = job.cfg
    ft = cfg.finetune
    frozen_model = job.frozen_stem.with_suffix(".keras")
    key = _key(job)
    work = writable_dir(work or job.work)
    state = RunState.start(work, key, ft.resume)  # never resumes a run made with other inputs
    trainer = phases.Trainer(job, work, state, dist)
    trainer.phase_one()
    if ft.epochs_head > 0 and state.frozen is None:
        score_frozen_dense(job, trainer.model, work, state)
    trainer.phase_two()
    model, gpu = trainer.model, trainer.gpu
    ids, y_true, y_pred = _predict(model, job.ds, "test", job.size, ft.batch_size)
    if dist and dist.index:  # every worker runs what the chief runs (the strategy's reductions need them all)
        model.save(work / "model.keras")  # but into its own folder, which the driver removes
        return None
    scores = results.scores(y_true, y_pred)
    uptodate.invalidate(job.stem.with_suffix(".json"))
    with atomic_path(job.out, ".keras") as tmp:
        model.save(tmp)
    search_seconds = state.search.seconds if state.search else 0.0
    res = FinetuneResult(
        job.out, float(state.val_accuracy), scores, state.phase_seconds, state.epochs_run, search_seconds
    )
    results.write_predictions(_pred(job.stem), ids, y_true, y_pred, job.ds.class_names)
    rows = [_finetune_row(job, res, state, len(y_true))]
    if state.frozen is not None and state.phase_seconds:
        (work / "frozen_dense.predictions.csv").replace(_pred(job.frozen_stem))
        if (work / "frozen_dense.keras").exists():  # absent only in a work folder resumed from an older version
            (work / "frozen_dense.keras").replace(frozen_model)
        rows.append(_frozen_row(job, state))
    res_path = results.results_path(cfg.artifacts, cfg.dataset_name)
    for row in rows:
        results.upsert(res_path, row)
    write_json_atomic(  # last: its inputs_key vouches for the files above
        job.stem.with_suffix(".json"),
        run_record(
            cfg,
            "finetune",
            inputs_key=key,
            weights=job.weights.source,
            val_accuracy=res.val_accuracy,
            scores=scores,
            phase_seconds=res.phase_seconds,
            search_seconds=res.search_seconds,
            epochs_run=res.epochs_run,
            best_epochs=state.best_epochs,
            class_names=job.ds.class_names,
            device="GPU" if gpu else "CPU",
            rows=rows,
        ),
    )
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nfinetune {job.spec.name}: val {res.val_accuracy:.4f}  test {scores['test_accuracy']:.4f}  "
        f"train {res.train_seconds:.1f}s (learning-rate search {res.search_seconds:.1f}s, phases "
        f"{', '.join(f'{s:.1f}s' for s in res.phase_seconds)})  -> {job.out}"
    )
    return res


def _job(cfg: Config, dataset: Dataset | None, n_subset: int | None) -> Job:
    ds = dataset or from_config(cfg)
    if n_subset is not None and n_subset >= len(ds.splits["train"]):
        n_subset = None
    if n_subset is not None:
        ds = ds.with_train(nested_subset(ds.splits["train"].labels, n_subset, cfg.data.seed))
        n_subset = len(ds.splits["train"])
    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    return Job(cfg, ds, spec, size, weights, model_path(cfg, n_subset), n_subset)


def score_frozen_dense(job: Job, model, work: Path, state: RunState) -> None:
    """The Keras-guide recipe (frozen backbone + dense head, backbone run every epoch): its own method."""
    ids, y_true, y_pred = _predict(model, job.ds, "test", job.size, job.cfg.finetune.batch_size)
    results.write_predictions(_pred(work / "frozen_dense"), ids, y_true, y_pred, job.ds.class_names)
    with atomic_path(work / "frozen_dense.keras", ".keras") as tmp:  # so `predict` can apply it too
        model.save(tmp)
    state.frozen = FrozenScore(scores=results.scores(y_true, y_pred), n_test=len(y_true))
    state.save(work)


def _finetune_row(job: Job, res: FinetuneResult, state: RunState, n_test: int) -> dict:
    ft = job.cfg.finetune
    params = FinetuneParams(
        epochs=[ft.epochs_head, ft.epochs_finetune],
        epochs_run=res.epochs_run,
        best_epochs=state.best_epochs,
        stop=state.stop,
        unfreeze_layers=ft.unfreeze_layers,
        learning_rate=ft.learning_rate,
        learning_rate_finetune=state.learning_rate_finetune,
        search=state.search if len(ft.lr_grid) > 1 else None,
        search_epochs=ft.search_epochs if len(ft.lr_grid) > 1 else 0,
        search_seconds=round(res.search_seconds, 1),
        schedule=ft.schedule,
        devices=state.devices,
        phase_seconds=[round(s, 1) for s in res.phase_seconds],
    ).to_params()
    return _row(
        job, "finetune", res.val_accuracy, res.scores, res.train_seconds, n_test, params, job.stem, res.search_seconds
    )


def _frozen_row(job: Job, state: RunState) -> dict:
    params = {
        "epochs_run": state.epochs_run[0],
        "best_epoch": state.best_epochs[0],
        "learning_rate": job.cfg.finetune.learning_rate,
    }
    frozen, seconds = state.frozen, state.phase_seconds[0]
    return _row(job, "frozen_dense", state.best_val[0], frozen.scores, seconds, frozen.n_test, params, job.frozen_stem)


def _row(
    job: Job, method: str, val: float, scores: dict, seconds: float, n_test: int, params, stem, tune: float = 0.0
) -> dict:
    """``seconds``: everything the method cost, ``tune`` of it the learning-rate search."""
    return results.row(
        dataset=job.cfg.dataset_name,
        backbone=job.spec.name,
        method=method,
        val_accuracy=val,
        scores=scores,
        tune_seconds=tune,
        fit_seconds=seconds - tune,
        n_train=len(job.ds.splits["train"]),
        n_test=n_test,
        params=params,
        weights=job.weights.source,
        predictions=str(_pred(stem).relative_to(Path(job.cfg.artifacts))),
        seed=job.extra_seed,
    )


def _pred(stem: Path) -> Path:
    return stem.with_name(stem.name + ".predictions.csv")
