"""`make export`: the answer as one self-contained model, with its class names and a manifest.

RGB 0-255 images of any height and width go in as float32, resized and preprocessed inside (the resize
is the pipeline's own bilinear ``tf.image.resize``, so a user's decoded pixels give exactly the report's
predictions); per-class scores come out: probabilities for logreg and the fine-tuned models, decision
values for ridge and linear SVM. A linear head on cached features is *folded*: its standardisation,
block weights and linear weights are one affine map, so they become one ``Dense`` layer on top of the
tapped feature model, and nothing of scikit-learn is needed at inference. The model is built from
built-in Keras layers only, then written by Keras' own ``Model.export`` (SavedModel, ONNX, LiteRT) or
``Model.save`` (``.keras``), so it runs where this package is not installed. A ``+meta`` head becomes a
two-input model (image, encoded metadata vector; the encoding is in the manifest). RBF SVM, k-NN and the
MLP do not fold: their export is the feature model plus the scikit-learn head, which ``predict`` applies.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import numpy as np

from pipeline.apply import methods
from pipeline.artifacts import library_versions, write_json_atomic
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.estimators import tuning
from pipeline.extract import runtimes
from pipeline.heads import registry

log = logging.getLogger(__name__)

FILES = {"keras": "model.keras", "saved_model": "saved_model", "onnx": "model.onnx", "litert": "model.tflite"}


def folded(head, d: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(W (d x outputs), bias, activation) with ``activation(x @ W + bias)`` equal to the pipeline's
    ``predict_proba`` (softmax) or ``decision_function`` (linear) on raw features x."""
    clf = head[-1]
    ab = tuning.affine(head[:-1], d) if len(head) > 1 else (np.ones(d, np.float32), np.zeros(d, np.float32))
    if ab is None:
        raise PipelineError("the head's preprocessing is not an affine map; it cannot be folded into a layer")
    a, b = (v.astype(np.float64) for v in ab)
    coef, icpt = clf.coef_.astype(np.float64), np.asarray(clf.intercept_, np.float64)
    proba = hasattr(clf, "predict_proba")
    if coef.shape[0] == 1:  # scikit-learn's binary form: one row for the second class
        coef, icpt = (
            (np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])) if proba else (coef, icpt)
        )
    elif coef.shape[0] == 2 and not proba:  # our heads keep a row per class; decision_function is their difference
        coef, icpt = coef[1:] - coef[:1], icpt[1:] - icpt[:1]
    W = (coef * a[None, :]).T
    bias = coef @ b + icpt
    return W.astype(np.float32), bias.astype(np.float32), "softmax" if proba else "linear"


def _image_input(size: int):
    """(input, resized): images of any height and width in (a batch shares one size), resized as
    ``data.load_image`` resizes (bilinear, no crop, no antialiasing) before anything else.

    ``training=False`` on the resize: Keras' image layers default to ``training=True``, and the first
    layer of a call sets the mode for every later one, so a plain ``model(x)`` ran the backbone's
    BatchNorm on batch statistics (and updated them) until this was said."""
    import keras

    image = keras.Input((None, None, 3), name="image")
    resize = keras.layers.Resizing(size, size, interpolation="bilinear", name="resize")
    return image, resize(image, training=False)


def any_size(model, size: int):
    """A one-input model (the feature model) behind the resize."""
    import keras

    image, x = _image_input(size)
    return keras.Model(image, model(x), name=model.name)


def build(method: methods.Method):
    """The exportable Keras model: image (and metadata) in, per-class scores out; built-in layers only.
    None when the head does not fold (the feature model is exported beside it)."""
    import keras

    if method.head is None:
        return _finetuned(method.model, method.input_size)
    if methods.is_keras(method.head) or not registry.get(method.method).foldable:
        return None
    image, x = _image_input(method.input_size)
    outputs = method.model(x)
    outputs = outputs if isinstance(outputs, list | tuple) else [outputs]
    blocks = [outputs[b] for b in method.blocks]
    inputs = [image]
    if method.encoding is not None:
        meta = keras.Input((len(method.encoding.names),), name="metadata")
        inputs.append(meta)
        blocks.append(meta)
    x = blocks[0] if len(blocks) == 1 else keras.layers.Concatenate(name="features")(blocks)
    W, bias, activation = folded(method.head, int(x.shape[-1]))
    dense = keras.layers.Dense(W.shape[1], activation=activation, name="scores", dtype="float32")
    out = dense(x)
    dense.set_weights([W, bias])
    return keras.Model(
        inputs if len(inputs) > 1 else inputs[0], out, name=f"{method.name}_exported".replace("@", "_at_")
    )


def _finetuned(model, size: int):
    """The fine-tuned model without its training-only layers (augmentation, dropout) and with its
    preprocessing as a built-in layer."""
    import keras

    from pipeline.backbones.layers import portable_preprocess
    from pipeline.backbones.taps import portable_base

    base = portable_base(next(layer for layer in model.layers if isinstance(layer, keras.Model)))[0]
    image, x = _image_input(size)
    pre = portable_preprocess(model.get_layer("preprocess").kind)
    x = base(pre(x) if pre is not None else model.get_layer("preprocess")(x), training=False)
    return keras.Model(image, model.get_layer("head")(x), name="finetuned_exported")


def write(model, fmt: str, folder: Path) -> Path:
    """One model file (or SavedModel folder) in ``folder`` by Keras' own writers."""
    path = folder / FILES[fmt]
    runtimes.keras_export(model, path, fmt)
    return path


def run(cfg: Config) -> Path:
    """Export the verdict's method (or ``--method``) into artifacts/export/<dataset>/<name>-<format>/."""
    fmt = cfg.export.format
    method = methods.load(cfg, cfg.export.method, portable=True)
    model = build(method)
    out = Path(cfg.export.output or Path(cfg.artifacts) / "export" / cfg.dataset_name / f"{method.name}-{fmt}")
    if model is None and fmt in ("onnx", "litert"):
        raise PipelineError(
            f"{method.name} ({method.method}) does not fold into a network layer, so it has no {fmt} form: export "
            "--format keras or saved_model (the feature model plus the scikit-learn head, applied by `predict`), "
            f"or pick a linear head ({', '.join(n for n, spec in registry.REGISTRY.items() if spec.foldable)})"
        )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        head_file = None
        if model is None:
            import joblib

            write(any_size(method.model, method.input_size), fmt, tmp)
            head_file = "head.keras" if methods.is_keras(method.head) else "head.joblib"
            if head_file == "head.keras":
                method.head.save(tmp / head_file)
            else:
                joblib.dump(method.head, tmp / head_file)
        else:
            write(model, fmt, tmp)
        labels = method.score_classes() or method.class_names
        (tmp / "labels.txt").write_text("\n".join(labels) + "\n")
        write_json_atomic(tmp / "manifest.json", manifest(cfg, method, fmt, head_file, labels))
        if out.exists():
            log.info("replacing %s", out)
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nexported {method.name} ({method.backbone}) as {fmt}: {out}")
    return out


def manifest(cfg: Config, method: methods.Method, fmt: str, head_file: str | None, labels: list[str]) -> dict:
    """What the model is, what goes in and comes out, and how good it was: everything a user needs to load it."""
    row = methods.head_row(cfg, method) or {}
    size = method.input_size
    inputs = [
        {
            "name": "image",
            "shape": [None, None, None, 3],
            "dtype": "float32",
            "values": "RGB 0-255 as decoded, any height and width (one size per batch); resized inside to "
            f"{size} x {size}, bilinear, no crop",
        }
    ]
    if method.encoding is not None:
        inputs.append({"name": "metadata", "shape": [None, len(method.encoding.names)], "dtype": "float32"})
    kind = method.score_kind
    return {
        "method": method.name,
        "family": method.method,
        "backbone": method.backbone,
        "format": fmt,
        "file": FILES[fmt],
        "self_contained": head_file is None,
        "head_file": head_file,
        "inputs": inputs,
        "output": {
            "kind": {"p": "probabilities", "score": "decision values", None: "none (predicted class from head.joblib)"}[
                kind
            ],
            "columns": labels,
            "binary_decision": kind == "score" and len(labels) == 1,
        },
        "labels": "labels.txt",
        "class_names": method.class_names,
        "val_accuracy": row.get("val_accuracy"),
        "test_accuracy": row.get("test_accuracy"),
        "n_train": row.get("n_train"),
        "cache_key": (method.record.get("cache") or {}).get("key"),
        "metadata_encoding": dataclasses.asdict(method.encoding) if method.encoding else None,
        "versions": library_versions(),
        "resize": f"inside the model: bilinear to {size} x {size}, no crop (pass the decoded image as it is; "
        "gray images converted to RGB)",
        "usage": USAGE[fmt],
    }


USAGE = {  # three lines per format: the decoded image as it is, in; scores out
    "keras": [
        "import keras, numpy as np; from PIL import Image",
        "model = keras.models.load_model('model.keras')",
        "scores = model.predict(np.asarray(Image.open('x.png').convert('RGB'), np.float32)[None])",
    ],
    "saved_model": [
        "import tensorflow as tf, numpy as np; from PIL import Image",
        "model = tf.saved_model.load('saved_model')",
        "scores = model.serve(np.asarray(Image.open('x.png').convert('RGB'), np.float32)[None]).numpy()",
    ],
    "onnx": [
        "import onnxruntime as ort, numpy as np; from PIL import Image",
        "s = ort.InferenceSession('model.onnx'); name = s.get_inputs()[0].name",
        "scores = s.run(None, {name: np.asarray(Image.open('x.png').convert('RGB'), np.float32)[None]})[0]",
    ],
    "litert": [
        "from ai_edge_litert.interpreter import Interpreter; import numpy as np; from PIL import Image",
        "x = np.asarray(Image.open('x.png').convert('RGB'), np.float32)[None]; m = Interpreter('model.tflite')",
        "i = m.get_input_details()[0]['index']; m.resize_tensor_input(i, x.shape); m.allocate_tensors()",
        "m.set_tensor(i, x); m.invoke(); scores = m.get_tensor(m.get_output_details()[0]['index'])",
    ],
}
