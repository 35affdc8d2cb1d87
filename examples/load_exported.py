"""Run a model from `make export` without this package: TensorFlow, Keras, ONNX Runtime or LiteRT alone.

    python examples/load_exported.py artifacts/export/<dataset>/<method>-<format> IMAGE... [--scores out.npy]

``IMAGE``: image files or folders of them, each passed to the model as decoded, RGB 0-255 float32 at its
own height and width (the model resizes inside, as the pipeline does); or ``.npy`` arrays (N, H, W, 3)
float32 RGB 0-255, read batch by batch. Prints the predicted class of each image, in order; with
``--scores``, saves the per-class scores. Copy ``load`` into your own code: it is all a model needs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def load(folder: str | Path):
    """(predict function: images (N, H, W, 3) float32 RGB 0-255, any H and W -> scores (N, K), manifest).
    Image-only models."""
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


def images(args: list[str]):
    """Batches in the order given: one decoded image per file (sizes differ), 32 rows at a time of a .npy."""
    from PIL import Image

    for arg in args:
        path = Path(arg)
        if path.suffix == ".npy":
            array = np.load(path, mmap_mode="r")  # any number of images
            for i in range(0, len(array), 32):
                yield np.asarray(array[i : i + 32], np.float32)
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            yield np.asarray(Image.open(f).convert("RGB"), np.float32)[None]


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an export folder (manifest.json inside)")
    parser.add_argument("images", nargs="+", help="image files, folders of them, or .npy arrays")
    parser.add_argument("--scores", help="save the per-class scores here (.npy)")
    args = parser.parse_args()
    predict, manifest = load(args.model)
    start, scores = time.perf_counter(), []
    for batch in images(args.images):
        scores.append(predict(batch))
    seconds = time.perf_counter() - start
    scores = np.concatenate(scores)
    print(f"# {len(scores)} images in {seconds:.2f} s ({len(scores) / seconds:.1f} img/s)", file=sys.stderr)
    if args.scores:
        np.save(args.scores, scores)
    for name in predicted_classes(scores, manifest):
        print(name)
