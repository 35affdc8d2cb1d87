"""Run a model from `make export` without this package: TensorFlow, Keras, ONNX Runtime or LiteRT alone.

    python examples/load_exported.py artifacts/export/<dataset>/<method>-<format> images.npy [scores.npy]

``images.npy``: float32 (N, H, W, 3), RGB 0-255, already resized to the manifest's input size (bilinear,
no crop). Prints the predicted class of each image; with a third argument, saves the per-class scores.
Copy ``load`` into your own code: it is all a model needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def load(folder: str | Path):
    """(predict function: images (N, H, W, 3) float32 -> scores (N, K), manifest). Image-only models."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    path = str(folder / manifest["file"])
    fmt = manifest["format"]
    if fmt == "keras":
        import keras

        model = keras.models.load_model(path)
        return (lambda x: np.asarray(model.predict_on_batch(x))), manifest
    if fmt == "saved_model":
        import tensorflow as tf

        saved = tf.saved_model.load(path)  # keep the object: its variables live as long as it does
        return (lambda x: saved.serve(tf.constant(x)).numpy()), manifest
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: session.run(None, {name: x})[0]), manifest
    if fmt == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)

        def run(x):
            inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            if tuple(inp["shape"]) != x.shape:
                interpreter.resize_tensor_input(inp["index"], x.shape)
                interpreter.allocate_tensors()
                inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
            interpreter.set_tensor(inp["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(out["index"]).copy()

        interpreter.allocate_tensors()
        return run, manifest
    raise ValueError(f"unknown format {fmt}")


def predicted_classes(scores: np.ndarray, manifest: dict) -> list[str]:
    """Class names from scores: argmax, or the sign of a binary decision value (positive: the second class)."""
    names = manifest["class_names"]
    if manifest["output"]["binary_decision"]:
        return [names[1] if s > 0 else names[0] for s in scores[:, 0]]
    labels = manifest["output"]["columns"]
    return [labels[i] for i in scores.argmax(axis=1)]


if __name__ == "__main__":
    import time

    predict, manifest = load(sys.argv[1])
    images = np.load(sys.argv[2], mmap_mode="r")  # read batch by batch: any number of images
    predict(np.asarray(images[:32], np.float32))  # the first call builds / traces: not timed
    start = time.perf_counter()
    scores = np.concatenate([predict(np.asarray(images[i : i + 32], np.float32)) for i in range(0, len(images), 32)])
    seconds = time.perf_counter() - start
    print(f"# {len(images)} images in {seconds:.2f} s ({len(images) / seconds:.1f} img/s)", file=sys.stderr)
    if len(sys.argv) > 3:
        np.save(sys.argv[3], scores)
    for name in predicted_classes(scores, manifest):
        print(name)
