"""The exported answer, measured side by side in one run on the same test images:

(a) the feature model alone in TensorFlow (what `extract`'s loop runs per batch),
(b) the exported model of the verdict's method in TensorFlow (the same feature model + the folded
    head), so b/a is what the folded head costs (goal >= 0.95: nothing),
(c) each exported format in its own runtime (Keras, SavedModel, ONNX Runtime, LiteRT), each in a
    fresh process where `import pipeline` fails: its throughput, its agreement with the head's
    predictions.csv on the test split, and the largest difference of its scores from the
    scikit-learn head's predict_proba / decision_function.

(a) and (b) are repeated, interleaved, min / median / max; the ratio uses the medians.
Usage: python benchmarks/export_runtimes.py --dataset fashion-mnist [--images 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import write  # noqa: E402

FORMATS = ("keras", "saved_model", "onnx", "litert")
WITHOUT_PIPELINE = str(ROOT / "tests" / "without_pipeline.py")


def rate(fn, x: np.ndarray, batch: int) -> float:
    fn(x[:batch])
    t0 = time.perf_counter()
    for i in range(0, len(x), batch):
        fn(x[i : i + batch])
    return len(x) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--images", type=int, default=2000, help="test images checked per format")
    ap.add_argument("--timed", type=int, default=256, help="images per timed pass of (a) and (b)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import tensorflow as tf

    from pipeline.apply import export, methods
    from pipeline.config import Config
    from pipeline.data import image_dataset
    from pipeline.extract.cache.reader import load_features

    cfg = Config()
    cfg.artifacts, cfg.data.dataset = args.artifacts, args.dataset
    method = methods.load(cfg, None, portable=True)
    model = export.build(method)
    if model is None:
        raise SystemExit(f"{method.name} does not fold into a layer; nothing to measure here")
    fs = load_features(method.cache_file)
    test = fs.with_layers(method.record["layer_names"]).splits["test"]
    n = min(args.images, len(test.ids))
    ref = (
        method.head.predict_proba(test.X[:n]) if method.score_kind == "p" else method.head.decision_function(test.X[:n])
    )
    ref = ref[:, None] if ref.ndim == 1 else ref
    saved = pd.read_csv(
        Path(args.artifacts) / "heads" / args.dataset / method.backbone / f"{method.name}.predictions.csv"
    )

    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    images = np.lib.format.open_memmap(
        work / "images.npy", "w+", np.float32, (n, method.input_size, method.input_size, 3)
    )
    start = 0
    for batch, _ in image_dataset([str(cfg.dataset_dir / i) for i in test.ids[:n]], method.input_size, 64):
        images[start : start + len(batch)] = batch.numpy()
        start += len(batch)
    images.flush()

    size = method.input_size
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    feats = tf.function(lambda x: method.model(x, training=False), input_signature=[spec])
    folded = tf.function(lambda x: model(x, training=False), input_signature=[spec])
    timed = np.asarray(images[: args.timed])
    a, b = [], []
    for _ in range(args.repeats):  # interleaved
        a.append(rate(feats, timed, 32))
        b.append(rate(folded, timed, 32))
    out = {"method": method.name, "backbone": method.backbone, "images": n, "timed_images": len(timed)}
    out["features_tf"] = {"min": min(a), "median": float(np.median(a)), "max": max(a)}
    out["exported_tf"] = {"min": min(b), "median": float(np.median(b)), "max": max(b)}
    out["exported_over_features"] = float(np.median(b) / np.median(a))
    print(f"{method.name} on {method.backbone}, {len(timed)} images x {args.repeats} (min / median / max img/s)")
    print(f"(a) feature model, TensorFlow:      {min(a):6.1f} {np.median(a):6.1f} {max(a):6.1f}")
    print(f"(b) exported model, TensorFlow:     {min(b):6.1f} {np.median(b):6.1f} {max(b):6.1f}")
    print(f"b/a = {out['exported_over_features']:.3f} (goal >= 0.95: the folded head costs nothing)")

    out["formats"] = {}
    for fmt in FORMATS:
        cfg.export.format, cfg.export.output = fmt, str(work / fmt)
        folder = export.run(cfg)
        run = subprocess.run(
            [sys.executable, WITHOUT_PIPELINE, str(ROOT / "examples" / "load_exported.py"), str(folder)]
            + [str(work / "images.npy"), "--scores", str(work / "scores.npy")],
            capture_output=True,
            text=True,
        )
        if run.returncode:
            print(f"{fmt}: failed: {run.stderr.strip().splitlines()[-1]}")
            out["formats"][fmt] = {"error": run.stderr[-2000:]}
            continue
        speed = float(run.stderr.strip().splitlines()[-1].split("(")[1].split()[0])
        agree = float(np.mean(np.asarray(run.stdout.split()) == saved["pred"].to_numpy()[:n]))
        diff = float(np.abs(np.load(work / "scores.npy") - ref).max())
        out["formats"][fmt] = {"img_per_s": speed, "agreement": agree, "max_abs_score_diff": diff}
        print(
            f"{fmt:12s} {speed:6.1f} img/s in a process without pipeline; agrees with predictions.csv on "
            f"{agree:.2%} of {n}; max |score - scikit-learn| {diff:.1e}"
        )
    print(f"-> {write('export_runtimes', out, args.artifacts)}")


if __name__ == "__main__":
    main()
