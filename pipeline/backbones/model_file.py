"""A backbone from a model the user trained or downloaded elsewhere: a ``.keras`` file, an ``.h5``
model or a SavedModel folder.

The embedding is the output of ``--layer`` (default: the last layer with a spatial output),
global-average-pooled when it is spatial and used as is when it is already a vector. The input size
comes from the model unless ``--input-size`` says otherwise (a model with a fixed input size must
be fed that size); ``--preprocessing`` says how the model expects its pixels. The model file's
content hash, the layer and the preprocessing are all in the cache key.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pipeline.errors import PipelineError, first_line

# --preprocessing value -> Preprocess kind (pipeline.backbones.layers)
PREPROCESSING = {
    "none": "none",  # raw RGB 0-255
    "tf": "mode_tf",  # [-1, 1]
    "torch": "mode_torch",  # ImageNet mean / std on [0, 1]
    "caffe": "mode_caffe",  # BGR, ImageNet mean subtracted
    "x-127/128": "efficientnet_lite",  # (x - 127) / 128
}


def is_model_path(name: str) -> bool:
    """Whether --backbone names a model file or folder rather than a registered backbone."""
    p = Path(name).expanduser()
    return p.suffix in (".keras", ".h5") or "/" in name or (p.is_dir() and (p / "saved_model.pb").exists())


def name_for(backbone: str) -> str:
    """The name artifacts use: a registered backbone's own, or a model file's (or folder's) name."""
    if not is_model_path(backbone):
        return backbone
    p = Path(backbone).expanduser()
    stem = p.stem if p.suffix in (".keras", ".h5") else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "model"


def digest(path: Path) -> str:
    """Content hash of the file, or of every file of a SavedModel folder (names included)."""
    from pipeline.artifacts import sha256_file

    if not path.is_dir():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(f for f in path.rglob("*") if f.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def declared_size(path: Path) -> tuple[bool, int | None]:
    """``(known, size)``: the input size a ``.keras`` file's saved config declares (None: any size), read
    without Keras, so that a stage that only names the backbone (heads, report) never imports TensorFlow.
    ``known`` is False where the file does not say plainly (an .h5 or SavedModel, a subclassed model,
    several inputs, an unreadable file): then the model is loaded, which also gives the clear error."""
    import json
    import zipfile

    if path.suffix != ".keras":
        return False, None
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
        layers = config["config"]["layers"]
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile):
        return False, None
    if config.get("class_name") not in ("Functional", "Model", "Sequential"):
        return False, None
    inputs = [la["config"] for la in layers if isinstance(la, dict) and la.get("class_name") == "InputLayer"]
    shapes = [c.get("batch_shape") or c.get("batch_input_shape") for c in inputs]
    if not inputs and config["class_name"] == "Sequential":
        shapes = [config["config"].get("build_input_shape")]
    if len(shapes) != 1 or not isinstance(shapes[0], list) or len(shapes[0]) != 4:
        return False, None
    return True, shapes[0][1] if isinstance(shapes[0][1], int) else None


def load(path: Path):
    """The model as a Keras model (a SavedModel becomes a one-layer model around its serving function)."""
    import keras

    from pipeline.backbones import layers as _registered  # noqa: F401  (our own layers, if the model has them)

    if not path.exists():
        raise PipelineError(f"backbone model {path} does not exist")
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").exists():
                raise PipelineError(f"{path} is a folder but not a SavedModel (no saved_model.pb)")
            return keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")
        return keras.models.load_model(path, compile=False)
    except PipelineError:
        raise
    except Exception as e:  # Keras raises many types for a file it cannot read
        raise PipelineError(f"cannot load backbone model {path}: {first_line(e)}") from None


def native_size(model) -> int | None:
    import keras

    if isinstance(model, keras.layers.TFSMLayer):  # the serving signature's image input
        try:
            args, kwargs = model.call_endpoint_fn.structured_input_signature
            specs = list(args) + list(kwargs.values())
            shape = specs[0].shape if len(specs) == 1 else None
            return int(shape[1]) if shape is not None and len(shape) == 4 and shape[1] is not None else None
        except (AttributeError, TypeError, IndexError):
            return None
    shape = model.input_shape
    if isinstance(shape, list):
        raise PipelineError("the backbone model has several inputs; it needs exactly one image input")
    return int(shape[1]) if shape[1] is not None else None


def embedding_model(model, layer: str | None, input_size: int, name: str):
    """Image (input_size x input_size x 3, preprocessed) -> pooled embedding, from ``layer``'s output."""
    import keras

    if isinstance(model, keras.layers.TFSMLayer):
        if layer:
            raise PipelineError("--layer needs a .keras or .h5 model; a SavedModel only exposes its outputs")
        inputs = keras.Input((input_size, input_size, 3))
        out = model(inputs)
        if isinstance(out, dict):
            out = out[sorted(out)[0]]
        return keras.Model(inputs, _pool(out), name=name)
    native = native_size(model)
    if native is not None and native != input_size:
        raise PipelineError(f"the backbone model takes {native}px images; --input-size {input_size} cannot be used")
    if layer:
        try:
            out = model.get_layer(layer).output
        except ValueError:
            names = ", ".join(la.name for la in model.layers[-8:])
            raise PipelineError(f"the backbone model has no layer '{layer}' (its last layers: {names})") from None
    else:
        spatial = [la for la in model.layers if _rank(la) == 4]
        out = spatial[-1].output if spatial else model.outputs[0]
    base = keras.Model(model.inputs, _pool(out), name=name)
    if native is None:  # flexible input size: fix it, so the graph has a shape to run at
        inputs = keras.Input((input_size, input_size, 3))
        base = keras.Model(inputs, base(inputs), name=name)
    return base


def _rank(layer) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):
        return 0


def _pool(x):
    import keras

    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="embedding_pool")(x)
    if len(x.shape) != 2:
        raise PipelineError(f"the embedding layer's output has shape {tuple(x.shape)}; need (H, W, C) or (D,)")
    return x
