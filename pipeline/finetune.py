"""`make finetune`: the fully fine-tuned Keras baseline, timed on the same splits.

Two phases, as in the Keras transfer-learning guide: (1) backbone frozen, train
the new head; (2) unfreeze the top of the backbone and train on at a ~10x lower
learning rate. BatchNorm layers must stay in inference mode when unfrozen: in
Keras 3 ``fit`` overrides the ``training=False`` of ``base(x, training=False)``
(keras-team/keras#20285), so they are also kept ``trainable=False``, which is
what makes BatchNormalization use its moving statistics. Same backbone, weights,
input size and preprocessing as ``extract``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline import backbones, results, uptodate
from pipeline.config import Config, atomic_path, run_record, writable_dir, write_json_atomic
from pipeline.data import Dataset, from_config, image_dataset, nested_subset
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model_path: Path
    val_accuracy: float
    scores: dict
    phase_seconds: list[float]
    epochs_run: list[int]

    @property
    def train_seconds(self) -> float:
        return float(sum(self.phase_seconds))


def model_path(cfg: Config, n_subset: int | None = None) -> Path:
    name = f"{backbones.name_for(cfg.backbone.backbone)}-finetuned{results.subset_suffix(n_subset)}.keras"
    return Path(cfg.artifacts) / "models" / cfg.dataset_name / name


AUGMENT_SEEDS = "independent per layer"  # in the inputs keys: results from the shared-seed recipe are redone


def augmentation_layers(names: tuple[str, ...], seed: int) -> list:
    """The Keras augmentation layers named in ``finetune.augment`` (also used for cached views), each with
    its own seed derived from the run's: one shared seed would make their draws move together."""
    from keras import layers

    aug = {
        "flip": lambda s: layers.RandomFlip("horizontal", seed=s),
        "zoom": lambda s: layers.RandomZoom(0.1, seed=s),
        "translate": lambda s: layers.RandomTranslation(0.1, 0.1, seed=s),
    }
    unknown = [a for a in names if a not in aug]
    if unknown:
        raise PipelineError(f"unknown augmentation(s) {', '.join(unknown)} (known: {', '.join(aug)})")
    seeds = np.random.SeedSequence(seed).generate_state(len(names))
    return [aug[name](int(s)) for name, s in zip(names, seeds, strict=True)]


def build_model(base, spec: backbones.BackboneSpec, n_classes: int, cfg: Config):
    """raw RGB -> [augmentation] -> preprocessing -> base(training=False) -> dropout -> softmax."""
    import keras
    from keras import layers

    from pipeline.backbones.layers import Preprocess

    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = inputs
    for layer in augmentation_layers(cfg.finetune.augment, cfg.data.seed):
        x = layer(x)  # active only while training
    x = Preprocess(spec.preprocess_kind, name="preprocess")(x)
    x = base(x, training=False)
    x = layers.Dropout(cfg.finetune.dropout, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetuned")


def set_trainable(base, phase: int, unfreeze_layers: int) -> int:
    """Phase 1: all frozen. Phase 2: the top ``unfreeze_layers`` layers (or all), BatchNorm
    excepted. Returns how many layers were unfrozen."""
    from keras import layers

    if phase == 1:
        base.trainable = False
        return 0
    base.trainable = True
    with_weights = [layer for layer in base.layers if layer.weights]
    n = len(with_weights) if unfreeze_layers < 0 else min(unfreeze_layers, len(with_weights))
    for layer in with_weights[: len(with_weights) - n]:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return n


def _optimizer(name: str, lr: float):
    import keras

    try:
        opt = keras.optimizers.get(name)
    except ValueError:
        raise PipelineError(f"unknown optimizer '{name}'") from None
    opt.learning_rate = lr
    return opt


@contextlib.contextmanager
def _quiet_end_of_data():
    """tf.data of unknown length (unreadable files are skipped): Keras learns the end by running out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield


def fit_phase(model, phase: int, epochs: int, train, val, cfg: Config, work: Path):
    """One compiled model.fit with the phase's callbacks; returns (seconds, epochs run, the epoch whose
    weights were kept (1-based), its val accuracy)."""
    import keras

    callbacks = [
        keras.callbacks.EarlyStopping(
            "val_accuracy", patience=cfg.finetune.patience, restore_best_weights=True, mode="max"
        ),
        keras.callbacks.ModelCheckpoint(
            work / f"phase{phase}.best.weights.h5",
            "val_accuracy",
            save_best_only=True,
            save_weights_only=True,
            mode="max",
        ),
        keras.callbacks.CSVLogger(work / "training_log.csv", append=True),
        keras.callbacks.BackupAndRestore(work / f"backup-phase{phase}"),
    ]
    if cfg.finetune.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(Path(cfg.finetune.tensorboard) / f"phase{phase}"))
    t0 = time.perf_counter()
    with _quiet_end_of_data():
        history = model.fit(
            train,
            validation_data=val,
            epochs=epochs,
            steps_per_epoch=cfg.finetune.steps_per_epoch,
            callbacks=callbacks,
            verbose=2,
            shuffle=False,  # the tf.data pipeline shuffles; this only silences Keras' warning
        )
    seconds = time.perf_counter() - t0
    accs = history.history.get("val_accuracy") or [float("nan")]
    best = int(np.nanargmax(accs)) if np.isfinite(accs).any() else 0
    return seconds, len(history.epoch), best + 1, float(accs[best])


def _predict(model, ds: Dataset, split: str, size: int, batch_size: int):
    """(ids, y_true, y_pred) of one split; unreadable images are left out (and said so)."""
    part = ds.splits[split]
    pred, index = [], []
    for images, idx in image_dataset(ds.paths(split), size, batch_size):  # carries each image's position
        pred.append(np.argmax(model(images, training=False), axis=1))
        index.append(idx.numpy())
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    if len(index) < len(part):
        log.warning("warning: %d unreadable %s images left out of the score", len(part) - len(index), split)
    y_pred = np.concatenate(pred) if pred else np.zeros(0, np.int64)
    return [part.ids[i] for i in index], part.labels[index], y_pred


def _inputs_key(cfg: Config, ds: Dataset, spec, weights, size: int) -> str:
    settings = {k: v for k, v in dataclasses.asdict(cfg.finetune).items() if k not in ("resume", "tensorboard")}
    return uptodate.inputs_key(
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
    """Fine-tune, evaluate once on test, save the model and `finetune` + `frozen_dense` results rows.

    ``n_subset``: train on a nested stratified subset of that many training images (learning curve);
    its artifacts get a ``-n<N>`` suffix. A result whose inputs match a saved one is reused."""
    import keras

    ft = cfg.finetune
    ds = dataset or from_config(cfg)
    if n_subset is not None and n_subset >= len(ds.splits["train"]):
        n_subset = None
    if n_subset is not None:
        ds = ds.with_train(nested_subset(ds.splits["train"].labels, n_subset, cfg.data.seed))
        n_subset = len(ds.splits["train"])
    spec = backbones.from_config(cfg.backbone)
    size = cfg.backbone.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), size)
    out = model_path(cfg, n_subset)
    stem = out.with_suffix("")
    frozen_stem = stem.with_name(stem.name.replace("-finetuned", "-frozen_dense"))
    frozen_model = frozen_stem.with_suffix(".keras")
    files = [out, _pred(stem)] + ([_pred(frozen_stem), frozen_model] if ft.epochs_head > 0 else [])
    key = _inputs_key(cfg, ds, spec, weights, size)
    saved = uptodate.reusable(stem.with_suffix(".json"), key, *files, force=cfg.force)
    if saved is not None:
        for row in saved["rows"]:
            results.upsert(results.results_path(cfg.artifacts, cfg.dataset_name), row)
        print(f"\nfinetune {spec.name} ({ds.summary()}): up to date, reused {out} (--force to redo)")
        return FinetuneResult(out, saved["val_accuracy"], saved["scores"], saved["phase_seconds"], saved["epochs_run"])

    work = writable_dir(out.with_name(out.stem + ".work"))
    state_file = work / "state.json"
    if not ft.resume:
        shutil.rmtree(work)
        work.mkdir()
    state = {"phase_seconds": [], "epochs_run": [], "best_epochs": [], "best_val": []}
    if state_file.exists():
        state.update(json.loads(state_file.read_text()))

    with backbones.device_policy(cfg.backbone.mixed_precision) as gpu:
        base = backbones.build_backbone(spec, weights, size, cfg.data.seed)
        keras.utils.set_random_seed(cfg.data.seed)
        model = build_model(base, spec, len(ds.class_names), cfg)
    log.info(
        "fine-tuning %s on %s (%s, %dpx) on %s: %d + %d epochs",
        spec.name,
        ds.summary(),
        weights.describe(),
        size,
        "GPU" if gpu else "CPU",
        ft.epochs_head,
        ft.epochs_finetune,
    )

    def split(name, shuffle):
        return image_dataset(
            ds.paths(name), size, ft.batch_size, ds.splits[name].labels, shuffle_seed=cfg.data.seed if shuffle else None
        )

    train, val = split("train", True), split("val", False)
    phases = [(1, ft.epochs_head, ft.learning_rate), (2, ft.epochs_finetune, ft.learning_rate * ft.finetune_lr_factor)]
    for phase, epochs, lr in phases:
        done = work / f"phase{phase}.done.weights.h5"
        n = set_trainable(base, phase, ft.unfreeze_layers)
        model.compile(_optimizer(ft.optimizer, lr), "sparse_categorical_crossentropy", metrics=["accuracy"])
        if done.exists():
            with warnings.catch_warnings():  # a finished phase's optimizer state is not wanted back
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(done)
            log.info("phase %d already done (resumed from %s)", phase, done.name)
        elif epochs > 0:
            log.info(
                "phase %d: %s, learning rate %g",
                phase,
                "backbone frozen" if phase == 1 else f"top {n} backbone layers trainable",
                lr,
            )
            seconds, ran, best_epoch, best_val = fit_phase(model, phase, epochs, train, val, cfg, work)
            model.save_weights(done)
            for k, v in zip(
                ("phase_seconds", "epochs_run", "best_epochs", "best_val"), (seconds, ran, best_epoch, best_val)
            ):
                state[k].append(v)
            write_json_atomic(state_file, state)
        if phase == 1 and epochs > 0 and "frozen" not in state:
            # the Keras-guide recipe (frozen backbone + dense head, backbone run every epoch): its own method
            ids, y_true, y_pred = _predict(model, ds, "test", size, ft.batch_size)
            results.write_predictions(_pred(work / "frozen_dense"), ids, y_true, y_pred, ds.class_names)
            with atomic_path(work / "frozen_dense.keras", ".keras") as tmp:  # so `predict` can apply it too
                model.save(tmp)
            state["frozen"] = {"scores": results.scores(y_true, y_pred), "n_test": len(y_true)}
            write_json_atomic(state_file, state)

    with _quiet_end_of_data():
        _, val_acc = model.evaluate(val, verbose=0)
    ids, y_true, y_pred = _predict(model, ds, "test", size, ft.batch_size)
    scores = results.scores(y_true, y_pred)

    uptodate.invalidate(stem.with_suffix(".json"))
    with atomic_path(out, ".keras") as tmp:
        model.save(tmp)
    res = FinetuneResult(out, float(val_acc), scores, state["phase_seconds"], state["epochs_run"])
    results.write_predictions(_pred(stem), ids, y_true, y_pred, ds.class_names)
    art = Path(cfg.artifacts)
    common = {
        "dataset": cfg.dataset_name,
        "backbone": spec.name,
        "features": "image",
        "layers": "last",
        "tune_seconds": 0.0,
        "extract_seconds": 0.0,
        "n_train": len(ds.splits["train"]),
        "weights": weights.source,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    rows = [
        {
            **common,
            "method": "finetune",
            "val_accuracy": res.val_accuracy,
            **scores,
            "train_seconds": res.train_seconds,
            "fit_seconds": res.train_seconds,
            "n_test": len(y_true),
            "params": json.dumps(
                {
                    "epochs": [ft.epochs_head, ft.epochs_finetune],
                    "epochs_run": res.epochs_run,
                    "best_epochs": state["best_epochs"],
                    "unfreeze_layers": ft.unfreeze_layers,
                    "learning_rate": ft.learning_rate,
                    "phase_seconds": [round(s, 1) for s in res.phase_seconds],
                }
            ),
            "predictions": str(_pred(stem).relative_to(art)),
        }
    ]
    if "frozen" in state and state["phase_seconds"]:
        (work / "frozen_dense.predictions.csv").replace(_pred(frozen_stem))
        if (work / "frozen_dense.keras").exists():  # absent only in a work folder resumed from an older version
            (work / "frozen_dense.keras").replace(frozen_model)
        rows.append(
            {
                **common,
                "method": "frozen_dense",
                "val_accuracy": state["best_val"][0],
                **state["frozen"]["scores"],
                "train_seconds": state["phase_seconds"][0],
                "fit_seconds": state["phase_seconds"][0],
                "n_test": state["frozen"]["n_test"],
                "params": json.dumps(
                    {
                        "epochs_run": state["epochs_run"][0],
                        "best_epoch": state["best_epochs"][0],
                        "learning_rate": ft.learning_rate,
                    }
                ),
                "predictions": str(_pred(frozen_stem).relative_to(art)),
            }
        )
    res_path = results.results_path(cfg.artifacts, cfg.dataset_name)
    for row in rows:
        results.upsert(res_path, row)
    write_json_atomic(  # last: its inputs_key vouches for the files above
        stem.with_suffix(".json"),
        run_record(
            cfg,
            "finetune",
            inputs_key=key,
            weights=weights.source,
            val_accuracy=res.val_accuracy,
            scores=scores,
            phase_seconds=res.phase_seconds,
            epochs_run=res.epochs_run,
            best_epochs=state["best_epochs"],
            class_names=ds.class_names,
            device="GPU" if gpu else "CPU",
            rows=rows,
        ),
    )
    shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nfinetune {spec.name}: val {res.val_accuracy:.4f}  test {scores['test_accuracy']:.4f}  "
        f"train {res.train_seconds:.1f}s (phases {', '.join(f'{s:.1f}s' for s in res.phase_seconds)})  -> {out}"
    )
    return res


def _pred(stem: Path) -> Path:
    return stem.with_name(stem.name + ".predictions.csv")
