"""Typed configuration: dataclass defaults <- TOML file <- command-line flags.

Every field carries its help text, so the CLI flags and their ``--help`` are
generated from these dataclasses and cannot drift from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    dataset: str = _opt("fashion-mnist", "dataset name under --data-root, or a path to a folder of class subfolders")
    data_root: str = _opt("data", "folder holding prepared datasets")
    val_fraction: float = _opt(0.15, "fraction carved out for validation when the dataset has no val/ folder")
    test_fraction: float = _opt(0.15, "fraction carved out for test when the dataset has no test/ folder")
    seed: int = _opt(0, "seed for splits, subsets and weight initialisation")
    metadata: str | None = _opt(None, "metadata CSV, one row per image (default: <dataset>/metadata.csv when present)")
    id_column: str | None = _opt(None, "metadata column of the image id (default: image_id, id, filename or the first)")
    labels: str | None = _opt(
        None,
        "a table (CSV, or CelebA's list_attr_celeba.txt layout) giving each image's class, for a flat folder of "
        "images without class subfolders; its other columns serve as metadata unless --metadata is given",
    )
    label_column: str | None = _opt(None, "with --labels: the column holding the class")


@dataclass
class PrepareConfig:
    n_train: int = _opt(3000, "training images to take from an embedded dataset (0 = all)")
    n_val: int = _opt(1000, "validation images (0 = all the rest of the training set)")
    n_test: int = _opt(2000, "test images (0 = all)")
    elpv_classes: int = _opt(2, "elpv: 2 (defective if probability >= 0.5, else functional) or 4 (the levels)")


@dataclass
class BackboneConfig:
    backbone: str = _opt(
        "efficientnet_lite0",
        "backbone name (`python -m pipeline backbones`) or your own model: a .keras / .h5 file or a SavedModel folder",
    )
    weights: str = _opt(
        "default",
        "'default' (packaged weights, or 'imagenet' from the Keras cache), 'imagenet', a weights file "
        "path, or 'none' (random, for tests only)",
    )
    input_size: int | None = _opt(None, "input side in pixels (default: the backbone's native size)")
    layer: str | None = _opt(
        None,
        "with --backbone PATH (.keras, .h5 or SavedModel folder): the layer whose output is the embedding "
        "(default: the last layer with a spatial output, average-pooled; a vector output is used as is)",
    )
    preprocessing: str | None = _opt(
        None,
        "with --backbone PATH: the pixels the model expects: none (RGB 0-255, default), tf ([-1, 1]), "
        "torch (ImageNet mean/std), caffe (BGR minus ImageNet mean), x-127/128",
    )
    mixed_precision: bool = _opt(True, "use float16 compute when a GPU is visible (ignored on CPU)")


@dataclass
class ExtractConfig:
    batch_size: int = _opt(32, "images per forward pass (also the resume granularity)")
    strict: bool = _opt(False, "fail on the first unreadable image instead of skipping it with a warning")
    taps: tuple[str, ...] = _opt(
        ("stages",),
        "intermediate layers pooled in the same forward pass: 'stages' (the last layer of each resolution "
        "stage, found from the graph), 'none', or layer names (`python -m pipeline backbones --taps BACKBONE`)",
    )
    tap_grid: int = _opt(1, "pool each tap to GRID x GRID cells and flatten (1 = global average)")
    views: int = _opt(0, "also cache this many augmented views of every training image (heads: --train-views)")
    engine: str = _opt(
        "local",
        "how the forward pass runs: local (this process) or ray (Ray Data across a cluster's CPUs/GPUs; "
        "RAY_ADDRESS joins an existing cluster, else a local one is started); the views pass stays local",
        choices=("local", "ray"),
    )
    runtime: str = _opt(
        "auto",
        "what runs the frozen forward pass: tf, onnx (ONNX Runtime) or openvino, the model converted once and "
        "reused (auto: onnx on CPU when installed, the fastest there, else tf; tf on a GPU)",
        choices=("auto", "tf", "onnx", "openvino"),
    )
    runtimes_dir: str = _opt(
        "",
        "folder of converted models, kept and reused by model (default: ARTIFACTS/runtimes); several artifacts "
        "folders pointed at one convert each model once",
    )
    ray_actors: int = _opt(0, "ray: model replicas (default: one per GPU in the cluster, else one per node)")
    ray_decoders: int = _opt(
        -1,
        "ray: parallel decode tasks; 0 decodes inside the model actors (-1, the default: 0 on a cluster "
        "without GPUs, where the forward pass needs every core, else the CPUs the GPU actors leave)",
    )


@dataclass
class HeadsConfig:
    heads: tuple[str, ...] = _opt(
        ("ridge", "logreg", "linear_svm", "rbf_svm"),
        "heads to fit: ridge logreg linear_svm rbf_svm nystroem mlp knn linear_probe (nystroem: an RBF SVM on "
        "every image of a large set; linear_probe streams from the cache for sets beyond RAM)",
    )
    layers: tuple[str, ...] = _opt(
        ("last", "all"),
        "layer sets the heads read, each its own results row: last (final embedding), all (every cached tap + "
        "last), auto (greedy search on val), or taps (together one set) as the report labels them, tap1 tap2 ..., "
        "or by their Keras layer names",
    )
    train_views: int = _opt(0, "also fit on this many cached augmented views of each training image (extract --views)")
    features: tuple[str, ...] = _opt(
        ("image", "image+meta", "image+meta_norm"),
        "feature sets: image, image+meta (raw metadata appended), image+meta_norm (standardised, weighted); "
        "the metadata ones run only when the dataset has metadata",
    )
    c_grid: tuple[float, ...] = _opt(
        (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4), "regularisation C values tried on the validation split"
    )
    alpha_grid: tuple[float, ...] = _opt(
        (1e-2, 1e-1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e5, 1e6), "ridge: penalties tried on the validation split"
    )
    exact_max_size: float = _opt(
        2e6,
        "logreg / linear_svm: up to this many matrix entries (images x features) scikit-learn's exact solvers on a "
        "warm-started C path; above it every C at once on float32 minibatches",
    )
    batch_size: int = _opt(512, "minibatch size of the large-data logreg / linear_svm solver and of linear_probe")
    probe_decays: tuple[float, ...] = _opt((1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1), "linear_probe: L2 decays, all at once")
    probe_epochs: int = _opt(
        12, "linear_probe: epochs (the step decays to zero over them; it stops early when no decay improved val for 3)"
    )
    memory_budget: str | None = _opt(
        None,
        "memory the in-memory heads may use: 8G, 512M, or a fraction of available RAM like 0.5 (default 0.75); "
        "over it they refuse and name linear_probe, which streams",
    )
    meta_weights: tuple[float, ...] = _opt(
        (0.5, 1.0, 2.0), "image+meta_norm: weights of the metadata block tried (1 = as much variance as the embedding)"
    )
    meta_columns: tuple[str, ...] = _opt((), "metadata columns to use (default: all but id and label-like columns)")
    metadata_missing: str = _opt("error", "images without metadata", choices=("error", "drop", "impute"))
    refit: str = _opt("train", "after tuning, refit on train or train+val", choices=("train", "train+val"))
    k_grid: tuple[int, ...] = _opt((1, 3, 5, 10, 20, 50), "knn: neighbour counts tried on the validation split")
    mlp_hidden: int = _opt(1024, "mlp: hidden units")
    mlp_dropout: tuple[float, ...] = _opt((0.25, 0.5), "mlp: dropout rates tried on the validation split")
    rbf_max_train: int = _opt(10000, "rbf_svm is O(N^2): above this many training images, subsample (stratified)")
    nystroem_components: int = _opt(4000, "nystroem: landmark images approximating the RBF kernel")
    max_iter: int = _opt(1000, "iteration cap for liblinear / lbfgs solvers")
    n_jobs: int = _opt(-1, "parallel jobs for the grid search (-1 = all cores)")


@dataclass
class FinetuneConfig:
    epochs_head: int = _opt(2, "phase 1 epochs: backbone frozen, new head trained")
    epochs_finetune: int = _opt(30, "phase 2: the most epochs (search included); early stopping on val ends it sooner")
    unfreeze_layers: int = _opt(-1, "phase 2: backbone layers trainable, from the top (-1 = all: full fine-tuning)")
    batch_size: int = _opt(32, "images per training step on each device or Ray worker (global batch: x their number)")
    learning_rate: float = _opt(1e-3, "phase 1 learning rate (backbone frozen, new head)")
    lr_grid: tuple[float, ...] = _opt(
        (1e-5, 1e-4, 1e-3),
        "phase 2 learning rates searched on val: each trains --search-epochs (annealed) from the phase-1 weights; "
        "those within the val noise of the best train the next rung, 3x longer, from their own weights; the chosen "
        "one (a tie after the last rung: the larger) continues to early stopping; search seconds charged. One: none",
    )
    search_epochs: float = _opt(
        1.0, "phase 2 epochs each rate trains in the search's first rung (below 1: that share; at least 30 steps)"
    )
    search_rungs: int = _opt(3, "most rungs of the learning-rate search (3x longer each, within half the epoch cap)")
    schedule: str = _opt(
        "plateau",
        "phase 2 rate: plateau (x0.3 when val stalls an epoch), cosine (to 0 over the cap), constant",
        choices=("plateau", "cosine", "constant"),
    )
    optimizer: str = _opt("adam", "any keras.optimizers name: adam, sgd, rmsprop, adamw, ...")
    dropout: float = _opt(0.2, "dropout before the new softmax layer")
    augment: tuple[str, ...] = _opt(
        ("flip", "zoom", "translate"),
        "augmentation layers: flip zoom translate (leave out flip where it changes the class)",
    )
    patience: int = _opt(3, "phase 2 stops after this many epochs without a better val accuracy (best weights kept)")
    memory_budget: str | None = _opt(
        None, "images are decoded once, kept in memory up to this (8G, 512M, a RAM fraction; default 0.5), else on disk"
    )
    steps_per_epoch: int | None = _opt(None, "cap on steps per epoch, for smoke runs (default: the whole training set)")
    devices: str = _opt(
        "auto",
        "auto: all GPUs if several (MirroredStrategy), else one; one; all (CPU devices too); batch per device",
        choices=("auto", "one", "all"),
    )
    engine: str = _opt(
        "local",
        "local (this process, its devices) or ray: --workers processes placed by Ray (RAY_ADDRESS joins a cluster) "
        "training data-parallel under MultiWorkerMirroredStrategy, each on its shard of the images",
        choices=("local", "ray"),
    )
    workers: int = _opt(2, "--engine ray: training workers (a GPU each when the cluster has one per worker)")
    seeds: int = _opt(
        1,
        "train this many times, training seeds seed, seed+1, ... on the same data (one results row each; the report "
        "gives mean ± sd across them)",
    )
    resume: bool = _opt(False, "continue an interrupted fine-tune from its last checkpoint")
    tensorboard: str | None = _opt(None, "write TensorBoard logs to this folder")


@dataclass
class CurveConfig:
    fractions: tuple[float, ...] = _opt(
        (0.01, 0.03, 0.1, 0.3, 1.0),
        "training-set sizes of the learning curve, as fractions of the training split (at least 2 images per class)",
    )
    finetune_fractions: tuple[float, ...] = _opt(
        (),
        "sizes (from --fractions) at which to fine-tune too; default: the smallest and the largest; 0 = none",
    )


@dataclass
class ForecastConfig:
    ladder: tuple[int, ...] = _opt(
        (), "training sizes of the small fine-tunes (default: a doubling ladder ending at --ladder-top of the data)"
    )
    ladder_points: int = _opt(3, "sizes of the generated ladder, each twice the one before")
    ladder_top: float = _opt(0.2, "the generated ladder's largest size, as a fraction of the training split")
    ladder_seeds: int = _opt(2, "training seeds at the smallest size, so the seed-to-seed noise is measured")
    finetune_budget: str | None = _opt(
        None,
        "then run the full fine-tune if its forecast cost is within this (30m, 1h, 2.5h); over it, print the "
        "command and stop (default: forecast only)",
    )


@dataclass
class ReportConfig:
    gradcam_images: int = _opt(6, "Grad-CAM overlays of the fine-tuned model (half correct, half wrong); 0 = none")
    subgroup_max_values: int = _opt(
        12, "metadata columns with more distinct values than this are not used for subgroups"
    )


@dataclass
class PredictConfig:
    images: str | None = _opt(
        None, "new images: a folder (searched recursively; class subfolders give labels) or a text file of paths"
    )
    method: str | None = _opt(
        None,
        "what to apply: a head as named in artifacts/heads (ridge, ridge@all, logreg+meta_norm, ...), finetune or "
        "frozen_dense (default: the method the report's verdict chose, artifacts/reports/<dataset>/choice.json)",
    )
    output: str | None = _opt(None, "predictions CSV (default: artifacts/predictions/<dataset>/<method>.csv)")
    image_metadata: str | None = _opt(
        None, "metadata CSV of the new images (a +meta method needs it; same id rules as training)"
    )
    image_labels: str | None = _opt(None, "a CSV giving the new images' classes (id column + 'label'), for accuracy")
    metadata_missing: str | None = _opt(
        None,
        "images without metadata: error, drop (listed, not scored) or impute (default: as in training)",
        choices=("error", "drop", "impute"),
    )
    batch_size: int = _opt(32, "images per forward pass")
    runtime: str = _opt(
        "auto",
        "what runs a head's feature model: tf, onnx or openvino (auto: the runtime that filled its cache, so the "
        "features are the ones it was fitted on)",
        choices=("auto", "tf", "onnx", "openvino"),
    )


@dataclass
class ExportConfig:
    method: str | None = _opt(None, "what to export, named as for predict (default: the verdict's choice)")
    format: str = _opt(
        "keras",
        "keras (.keras), saved_model (TensorFlow SavedModel), onnx, or litert (.tflite)",
        choices=("keras", "saved_model", "onnx", "litert"),
    )
    output: str | None = _opt(None, "folder (default: artifacts/export/<dataset>/<method>-<format>/)")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    artifacts: str = _opt("artifacts", "folder for every artifact the pipeline writes")
    force: bool = _opt(False, "redo results whose inputs have not changed instead of reusing them")
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)
    forecast: ForecastConfig = field(default_factory=ForecastConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    explicit: tuple[str, ...] = _opt((), "the options set in the TOML file or on the command line (section.name)")

    @property
    def dataset_dir(self) -> Path:
        p = Path(self.data.dataset)
        if p.is_dir() and (len(p.parts) > 1 or not (Path(self.data.data_root) / p).is_dir()):
            return p
        return Path(self.data.data_root) / self.data.dataset

    @property
    def metadata_path(self) -> Path | None:
        """The configured metadata CSV, else <dataset>/metadata.csv when it exists."""
        if self.data.metadata:
            return Path(self.data.metadata)
        if self.data.labels:
            return Path(self.data.labels)
        default = self.dataset_dir / "metadata.csv"
        return default if default.exists() else None

    @property
    def dataset_name(self) -> str:
        return self.dataset_dir.resolve().name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])}


def flags(sections: list[str], taken: set[str] = frozenset()) -> dict[tuple[str, str], str]:
    """Each (section, field)'s flag on a command that takes ``sections`` in that order (after the flags in
    ``taken``): ``--name``, or ``--section-name`` where an earlier one took the name (``batch_size``)."""
    out, used = {}, set(taken)
    types_ = section_types()
    for section in sections:
        for f in dataclasses.fields(types_[section]):
            flag = "--" + f.name.replace("_", "-")
            if flag in used:
                flag = f"--{section}-{f.name.replace('_', '-')}"
            used.add(flag)
            out[section, f.name] = flag
    return out


def _apply(obj, values: dict[str, Any], where: str, given: list[str] | None = None) -> None:
    """Set ``values`` (a TOML table) on ``obj``; the dotted names set are appended to ``given``."""
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            raise PipelineError(f"unknown option {where}.{key} (known: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise PipelineError(f"{where}.{key} must be a table")
            _apply(current, value, f"{where}.{key}", given)
        else:
            setattr(obj, key, tuple(value) if isinstance(value, list) else value)
            if given is not None:
                given.append(f"{where}.{key}".removeprefix("config."))


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults, then the TOML file, then explicitly given flags."""
    cfg = Config()
    given: list[str] = []
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            with open(path, "rb") as f:
                _apply(cfg, tomllib.load(f), "config", given)
        except FileNotFoundError:
            raise PipelineError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise PipelineError(f"config file {path} is not valid TOML: {e}") from None
    if getattr(args, "artifacts", None):
        cfg.artifacts = args.artifacts
    if getattr(args, "force", False):
        cfg.force = True
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, name = dest.split(".", 1)
            setattr(getattr(cfg, section), name, tuple(value) if isinstance(value, list) else value)
            given.append(dest)
    cfg.explicit = tuple(dict.fromkeys(given))
    return cfg
