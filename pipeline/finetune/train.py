"""Training, scoring and saving a fine-tune: two ``model.fit`` phases with callbacks (early stopping,
checkpoints, backup-and-restore for resume), one test pass, the `finetune` and `frozen_dense` rows."""

from __future__ import annotations

import dataclasses
import json
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
from pipeline.finetune.record import FinetuneParams, SearchRecord

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


def model_path(cfg: Config, n_subset: int | None = None, extra_seed: int | None = None) -> Path:
    """``extra_seed``: a training seed beyond the configured one (``--seeds``), named ``-seed<N>``."""
    seed = f"-seed{extra_seed}" if extra_seed is not None else ""
    name = f"{backbones.name_for(cfg.backbone.backbone)}-finetuned{results.subset_suffix(n_subset)}{seed}.keras"
    return Path(cfg.artifacts) / "models" / cfg.dataset_name / name


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


@dataclass
class _Job:
    """One fine-tune: its data, backbone, weights and where its artifacts go."""

    cfg: Config
    ds: Dataset
    spec: backbones.BackboneSpec
    size: int
    weights: backbones.Weights
    out: Path  # the fine-tuned model; its stem names the predictions and the record
    n_subset: int | None = None  # a learning-curve point's training images (None: the whole split)
    extra_seed: int | None = None  # a training seed beyond the configured one (``--seeds``)

    def with_seed(self, seed: int) -> _Job:
        """The same fine-tune (data, weights) under another training seed, with its own artifacts."""
        return dataclasses.replace(self, out=model_path(self.cfg, self.n_subset, seed), extra_seed=seed)

    @property
    def seed(self) -> int:
        """The training seed: initialisation, augmentation draws, shuffling."""
        return self.cfg.data.seed if self.extra_seed is None else self.extra_seed

    @property
    def stem(self) -> Path:
        return self.out.with_suffix("")

    @property
    def frozen_stem(self) -> Path:
        return self.stem.with_name(self.stem.name.replace("-finetuned", "-frozen_dense"))


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


def _fine_tune(job: _Job, n_subset: int | None, seed: int | None = None) -> FinetuneResult:
    """One training seed: the saved result when up to date, else trained here or on Ray workers."""
    reused = _reused(job)
    if reused is not None:
        return reused
    if job.cfg.finetune.engine == "ray" and job.cfg.finetune.workers > 1:
        from pipeline.finetune import workers

        return workers.run(job.cfg, _work(job), run_as_worker, job.cfg, n_subset, seed)
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
    return _train_and_save(job, dist, worker_dir(_work(job), index))


def _work(job: _Job) -> Path:
    return job.out.with_name(job.out.stem + ".work")


def _reused(job: _Job) -> FinetuneResult | None:
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


def _key(job: _Job) -> str:
    return _inputs_key(job.cfg, job.ds, job.spec, job.weights, job.size, job.extra_seed)


def _files(job: _Job) -> list[Path]:
    frozen = [_pred(job.frozen_stem), job.frozen_stem.with_suffix(".keras")] if job.cfg.finetune.epochs_head > 0 else []
    return [job.out, _pred(job.stem)] + frozen


def _train_and_save(job: _Job, dist: phases.Workers | None = None, work: Path | None = None) -> FinetuneResult | None:
    """One training seed, trained here (or as one of several Ray workers); the result on the chief, None on
    the other workers, which write nothing of their own."""
    cfg = job.cfg
    ft = cfg.finetune
    frozen_model = job.frozen_stem.with_suffix(".keras")
    key = _key(job)
    work = writable_dir(work or _work(job))
    state = _fresh_state(key)
    if (work / "state.json").exists():
        state.update(json.loads((work / "state.json").read_text()))
    if not ft.resume or state["inputs_key"] != key:  # never resume a run made with other inputs
        if ft.resume:
            log.warning("notice: %s was started with other settings; starting over", work.name)
        shutil.rmtree(work)
        work.mkdir()
        state = _fresh_state(key)
    model, gpu = phases.train(job, work, state, score_frozen_dense, dist)
    val_acc = state["best_val"][-1] if state["best_val"] else float("nan")
    ids, y_true, y_pred = _predict(model, job.ds, "test", job.size, ft.batch_size)
    if dist and dist.index:  # every worker runs what the chief runs (the strategy's reductions need them all)
        model.save(work / "model.keras")  # but into its own folder, which the driver removes
        return None
    scores = results.scores(y_true, y_pred)
    uptodate.invalidate(job.stem.with_suffix(".json"))
    with atomic_path(job.out, ".keras") as tmp:
        model.save(tmp)
    res = FinetuneResult(
        job.out, float(val_acc), scores, state["phase_seconds"], state["epochs_run"], _search(state).seconds
    )
    results.write_predictions(_pred(job.stem), ids, y_true, y_pred, job.ds.class_names)
    rows = [_finetune_row(job, res, state, len(y_true))]
    if "frozen" in state and state["phase_seconds"]:
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
            best_epochs=state["best_epochs"],
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


def _search(state: dict) -> SearchRecord:
    return SearchRecord.from_dict(state["search"]) if "search" in state else SearchRecord()


def _fresh_state(key: str) -> dict:
    """A work folder's progress before any phase: seconds, epochs run, best epochs and val per phase."""
    return {"phase_seconds": [], "epochs_run": [], "best_epochs": [], "best_val": [], "inputs_key": key}


def _job(cfg: Config, dataset: Dataset | None, n_subset: int | None) -> _Job:
    ds = dataset or from_config(cfg)
    if n_subset is not None and n_subset >= len(ds.splits["train"]):
        n_subset = None
    if n_subset is not None:
        ds = ds.with_train(nested_subset(ds.splits["train"].labels, n_subset, cfg.data.seed))
        n_subset = len(ds.splits["train"])
    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    return _Job(cfg, ds, spec, size, weights, model_path(cfg, n_subset), n_subset)


def score_frozen_dense(job: _Job, model, work: Path, state: dict) -> None:
    """The Keras-guide recipe (frozen backbone + dense head, backbone run every epoch): its own method."""
    ids, y_true, y_pred = _predict(model, job.ds, "test", job.size, job.cfg.finetune.batch_size)
    results.write_predictions(_pred(work / "frozen_dense"), ids, y_true, y_pred, job.ds.class_names)
    with atomic_path(work / "frozen_dense.keras", ".keras") as tmp:  # so `predict` can apply it too
        model.save(tmp)
    state["frozen"] = {"scores": results.scores(y_true, y_pred), "n_test": len(y_true)}
    write_json_atomic(work / "state.json", state)


def _finetune_row(job: _Job, res: FinetuneResult, state: dict, n_test: int) -> dict:
    ft = job.cfg.finetune
    params = FinetuneParams(
        epochs=[ft.epochs_head, ft.epochs_finetune],
        epochs_run=res.epochs_run,
        best_epochs=state["best_epochs"],
        stop=state.get("stop"),
        unfreeze_layers=ft.unfreeze_layers,
        learning_rate=ft.learning_rate,
        learning_rate_finetune=state.get("learning_rate_finetune"),
        search=_search(state) if len(ft.lr_grid) > 1 else None,
        search_epochs=ft.search_epochs if len(ft.lr_grid) > 1 else 0,
        search_seconds=round(res.search_seconds, 1),
        schedule=ft.schedule,
        devices=state.get("devices"),
        phase_seconds=[round(s, 1) for s in res.phase_seconds],
    ).to_params()
    return _row(
        job, "finetune", res.val_accuracy, res.scores, res.train_seconds, n_test, params, job.stem, res.search_seconds
    )


def _frozen_row(job: _Job, state: dict) -> dict:
    params = {
        "epochs_run": state["epochs_run"][0],
        "best_epoch": state["best_epochs"][0],
        "learning_rate": job.cfg.finetune.learning_rate,
    }
    frozen = state["frozen"]
    seconds = state["phase_seconds"][0]
    return _row(
        job, "frozen_dense", state["best_val"][0], frozen["scores"], seconds, frozen["n_test"], params, job.frozen_stem
    )


def _row(
    job: _Job, method: str, val: float, scores: dict, seconds: float, n_test: int, params, stem, tune: float = 0.0
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
