"""Extraction throughput, measured side by side in one run on the same backbone and batch:

(a) raw forward pass on in-memory tensors (compiled, no I/O), in each runtime installed (TensorFlow,
    ONNX Runtime, OpenVINO: the same model, converted by Keras' own exporter); "best (a)" is the fastest,
(b) the pipeline's `extract` from image files on disk to the HDF5 cache, with its default runtime
    (`--runtime auto`); goals: b / best (a) >= 0.90 and b >= 2 x (a) in TensorFlow,
(c) the idiomatic Keras way: image_dataset_from_directory + model.predict,
(d) `extract` with the default taps (every resolution stage pooled in the same pass),
(e) with `--engine ray`: (b) on the Ray engine (a local Ray cluster on this machine); also its whole
    command, and its rate after the first rows come back (steady state, without the actors' start),
(f) decoding alone (read + decode + resize, no model): the input side's ceiling, for the scaling model,
(g) the whole `python -m pipeline extract` command as a user runs it (default taps, ``--whole-images``):
    first with the runtime conversion not yet cached, then `--force` with it cached; goal: the cached
    run's extraction loop ÷ its wall time >= 0.80, and no converter output printed.

(b) and (e) run with `--taps none`, so (a)-(c) and (e) compare the same single output. Every measure is
repeated, interleaved (so drift in machine speed hits all alike), and reported as min / median / max;
the ratios use the medians. Also the peak RSS of `extract` on two dataset sizes (memory must not grow
with the dataset).
Usage: python benchmarks/extract_throughput.py [--images 2000] [--repeats 3] [--engine ray]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import write  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int, source: Path | None, seed: int = 0) -> Path:
    """n PNGs in class subfolders: copies of the default data when present, else generated."""
    rng = np.random.default_rng(seed)
    files = sorted(source.rglob("*.png")) if source and source.is_dir() else []
    for i in range(n):
        cls = folder / f"c{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        if files:
            shutil.copy(files[i % len(files)], cls / f"{i:06d}.png")
        else:
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(cls / f"{i:06d}.png")
    return folder


def raw_forward(model, size: int, batch: int, n: int) -> float:
    import tensorflow as tf

    x = tf.random.uniform((batch, size, size, 3), 0, 255)

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def forward(t):
        return model(t, training=False)

    forward(x).numpy()  # trace once, as extract's first batch does
    steps = n // batch
    t0 = time.perf_counter()
    for _ in range(steps):
        forward(x).numpy()
    return steps * batch / (time.perf_counter() - t0)


def raw_forward_runtime(
    spec, base, runtime: str, size: int, batch: int, n: int, folder: Path, tapped: tuple[str, ...] = ()
) -> float:
    """(a) in ONNX Runtime / OpenVINO: the portable twin of the same model, converted as extract does it, run
    with the runtime's default threading (extract turns ONNX Runtime's spinning off to share the cores with
    decoding: the ratio b / a charges it that);
    ``tapped``: with those taps (extract's default: ``("stages",)``), the model (d) runs."""
    from pipeline.backbones import taps
    from pipeline.extract import runtimes

    chosen = taps.resolve(base, tapped, 1, spec.name) if tapped else []
    model = taps.feature_model(spec, base, chosen)
    key = {"backbone": spec.name, "taps": list(tapped)}
    forward, used = runtimes.forward_for(
        runtime, model, lambda: taps.feature_model(spec, base, chosen, portable=True), key, folder
    )
    if used != runtime:
        return float("nan")
    if runtime == "onnx":  # the runtime at its own defaults (idle threads spin): its fastest on tensors in memory
        path = runtimes.converted_path(folder, key, "onnx")
        forward = runtimes.onnx_run(runtimes.onnx_session(path, os.cpu_count() or 0))
    x = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    forward(x)
    steps = n // batch
    t0 = time.perf_counter()
    for _ in range(steps):
        forward(x)
    return steps * batch / (time.perf_counter() - t0)


def decode_only(folder: Path, size: int, batch: int) -> float:
    """(f) the input side alone: read + decode + resize, as extract's local engine does it for PNGs."""
    from pipeline.data import decode

    paths = sorted(str(p) for p in folder.rglob("*.png"))
    t0 = time.perf_counter()
    n = sum(int(images.shape[0]) for images, _ in decode.batches(paths, size, batch))
    return n / (time.perf_counter() - t0)


def keras_idiomatic(model, folder: Path, size: int, batch: int) -> float:
    import keras

    t0 = time.perf_counter()
    ds = keras.utils.image_dataset_from_directory(
        folder, labels=None, image_size=(size, size), batch_size=batch, shuffle=False, verbose=False
    )
    out = model.predict(ds, verbose=0)
    return len(out) / (time.perf_counter() - t0)


class _FirstRows(logging.Handler):
    """Keeps the Ray engine's time to first rows, which it logs once per pass."""

    def __init__(self):
        from pipeline.extract.engines.ray_data import FIRST_ROWS

        super().__init__(logging.INFO)
        self.message = FIRST_ROWS
        self.seconds: list[float] = []

    def emit(self, record):
        if record.msg == self.message:
            self.seconds.append(float(record.args[0]))


def pipeline_extract(
    folder: Path,
    artifacts: Path,
    backbone: str,
    batch: int,
    size: int | None,
    taps: tuple[str, ...] = ("none",),
    engine: str = "local",
    runtime: str = "auto",
) -> tuple[float, float]:
    """Runs the real stage; returns (images/s over its whole run, images/s over its extraction loop)."""
    from pipeline.config import Config
    from pipeline.extract import stage as extract

    cfg = Config()
    cfg.artifacts = str(artifacts)
    cfg.data.dataset = str(folder)
    cfg.data.val_fraction = cfg.data.test_fraction = 0.1
    cfg.backbone.backbone = backbone
    cfg.backbone.input_size = size
    cfg.extract.batch_size = batch
    cfg.extract.taps = taps
    cfg.extract.engine = engine
    cfg.extract.runtime = runtime
    t0 = time.perf_counter()
    res = extract.run(cfg)
    wall = time.perf_counter() - t0
    return res.n_images / wall, res.n_images / res.seconds


_PEAK = (
    "import resource, subprocess, sys; run = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "sys.stdout.write(run.stdout); sys.stderr.write(run.stderr); "
    "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(run.returncode)"
)


def extract_command(folder: Path, artifacts: Path, backbone: str, batch: int, size: int) -> list[str]:
    """A fresh `python -m pipeline extract` as a user runs it (a tenth of the images each for val and test)."""
    cmd = [sys.executable, "-m", "pipeline", "extract", "--dataset", str(folder), "--artifacts", str(artifacts)]
    cmd += ["--backbone", backbone, "--batch-size", str(batch), "--input-size", str(size)]
    return cmd + ["--val-fraction", "0.1", "--test-fraction", "0.1"]


def run_with_peak(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` run from a small parent (``_PEAK``), and the peak RSS in MiB of the largest process it ran
    (itself or a conversion child): a process started from this one would inherit this one's peak, since
    Linux carries a process's peak RSS across exec."""
    run = subprocess.run([sys.executable, "-c", _PEAK, *cmd], capture_output=True, text=True, check=True)
    return run, int(run.stdout.strip().splitlines()[-1].split()[-1]) / 1024


def peak_rss_mb(folder: Path, artifacts: Path, backbone: str, batch: int, size: int) -> float:
    """Peak RSS of a fresh `extract` command, in MiB."""
    return run_with_peak(extract_command(folder, artifacts, backbone, batch, size))[1]


def whole_command(folder: Path, artifacts: Path, backbone: str, batch: int, size: int) -> dict:
    """(g): wall time of a fresh `extract` process vs its own extraction loop (the cache's extract_seconds),
    without and with the converted model cached; whether any converter output reached the terminal; and
    the peak RSS of the largest process the command ran (itself, or its conversion child)."""
    import h5py

    cmd = extract_command(folder, artifacts, backbone, batch, size)
    out = {}
    for name, extra in (("uncached_conversion", []), ("cached_conversion", ["--force"])):
        t0 = time.perf_counter()
        run, peak_mb = run_with_peak([*cmd, *extra])
        wall = time.perf_counter() - t0
        cache = next((artifacts / "features").rglob("*.h5"))
        with h5py.File(cache, "r") as f:
            loop = float(f.attrs["extract_seconds"])
        printed = run.stdout + run.stderr
        chatter = [w for w in ("tf2onnx", "After optimization", "constant folding", "FutureWarning") if w in printed]
        out[name] = {"wall_s": round(wall, 1), "loop_s": round(loop, 1), "loop_over_wall": round(loop / wall, 3)}
        out[name]["peak_rss_mb"] = round(peak_mb, 1)
        out[name]["converter_output_printed"] = chatter
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--images", type=int, default=2000, help="images for the throughput comparison")
    ap.add_argument("--repeats", type=int, default=3, help="each measure is repeated (min / median / max)")
    ap.add_argument("--engine", default="local", choices=("local", "ray"), help="ray: also measure (e)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-size", type=int, default=None, help="default: the backbone's native size")
    ap.add_argument("--rss-sizes", type=int, nargs=2, default=(2000, 8000))
    ap.add_argument("--rss-input-size", type=int, default=96, help="smaller input keeps the RSS runs short")
    ap.add_argument("--whole-images", type=int, default=6000, help="images for (g), the whole command")
    ap.add_argument("--source", default="data/fashion-mnist/train")
    ap.add_argument("--artifacts", default="artifacts")
    args = ap.parse_args()

    from pipeline import backbones
    from pipeline.backbones import taps
    from pipeline.extract import runtimes

    spec = backbones.get(args.backbone)
    size = args.input_size or spec.input_size
    weights = backbones.resolve_weights(spec, args.weights, Path(args.artifacts), size)
    base = backbones.build_backbone(spec, weights, size)
    model = taps.feature_model(spec, base, [])
    others = [r for r in ("onnx", "openvino") if runtimes.available(r)]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = make_images(tmp / "images", args.images, Path(args.source))
        runs: dict[str, list[float]] = {k: [] for k in ("a", "b", "b_wall", "c", "d", "e", "e_wall", "e_steady", "f")}
        first_rows = _FirstRows()
        if args.engine == "ray":
            import ray

            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            logging.getLogger("pipeline.extract.engines.ray_data").setLevel(logging.INFO)
            logging.getLogger("pipeline.extract.engines.ray_data").addHandler(first_rows)
        for r in range(args.repeats):  # interleaved, so drift in machine speed hits all of them alike
            for rt in others:  # each pipeline run right after the raw forward it is compared with
                runs.setdefault(f"a_{rt}", []).append(
                    raw_forward_runtime(spec, base, rt, size, args.batch_size, args.images, tmp / "runtimes")
                )
            bw, bl = pipeline_extract(folder, tmp / f"art-{r}", args.backbone, args.batch_size, size)
            runs["b_wall"].append(bw)
            runs["b"].append(bl)
            runs.setdefault("a_taps_onnx", []).append(
                raw_forward_runtime(
                    spec, base, "onnx", size, args.batch_size, args.images, tmp / "runtimes", ("stages",)
                )
            )
            runs["d"].append(
                pipeline_extract(folder, tmp / f"taps-{r}", args.backbone, args.batch_size, size, ("stages",))[1]
            )
            runs["a"].append(raw_forward(model, size, args.batch_size, args.images))
            runs["c"].append(keras_idiomatic(model, folder, size, args.batch_size))
            runs["f"].append(decode_only(folder, size, args.batch_size))
            if args.engine == "ray":
                ew, el = pipeline_extract(folder, tmp / f"ray-{r}", args.backbone, args.batch_size, size, engine="ray")
                runs["e_wall"].append(ew)
                runs["e"].append(el)
                seconds, first = args.images / el, first_rows.seconds[-1]
                runs["e_steady"].append((args.images - args.batch_size) / (seconds - first))
                runs.setdefault("e_first_rows_s", []).append(first)
        f = make_images(tmp / "whole", args.whole_images, Path(args.source))
        whole = whole_command(f, tmp / "art-whole", args.backbone, args.batch_size, size)
        shutil.rmtree(f)
        rss = {}
        for n in args.rss_sizes:
            f = make_images(tmp / f"rss{n}", n, Path(args.source))
            rss[str(n)] = round(peak_rss_mb(f, tmp / f"art{n}", args.backbone, args.batch_size, args.rss_input_size), 1)
            shutil.rmtree(f)

    med = {k: float(np.median(v)) for k, v in runs.items() if v}
    spread = {k: [round(min(v), 2), round(med[k], 2), round(max(v), 2)] for k, v in runs.items() if v}
    result = {
        "backbone": args.backbone,
        "weights": weights.source,
        "input_size": size,
        "batch_size": args.batch_size,
        "images": args.images,
        "repeats": args.repeats,
        "default_runtime": runtimes.resolve("auto", False),
        "img_s_min_median_max": {
            "a_raw_forward_tf": spread["a"],
            **{f"a_raw_forward_{rt}": spread[f"a_{rt}"] for rt in others},
            "b_pipeline_extract_loop": spread["b"],
            "b_pipeline_extract_whole_command": spread["b_wall"],
            "c_keras_idiomatic": spread["c"],
            "d_pipeline_extract_default_taps": spread["d"],
            **(
                {
                    "e_ray_engine_loop": spread["e"],
                    "e_ray_engine_whole_command": spread["e_wall"],
                    "e_ray_engine_after_first_rows": spread["e_steady"],
                }
                if "e" in spread
                else {}
            ),
            "a_raw_forward_onnx_default_taps": spread["a_taps_onnx"],
            "f_decode_only": spread["f"],
        },
        "ratio_b_over_a_tf": round(med["b"] / med["a"], 3),
        "ratio_b_over_best_a": round(med["b"] / max(med["a"], *(med[f"a_{rt}"] for rt in others)), 3),
        "ratio_b_over_best_a_by_round": _by_round(runs, "b", ["a", *(f"a_{rt}" for rt in others)]),
        "ratio_d_over_a_taps_by_round": _by_round(runs, "d", ["a_taps_onnx"]),
        "ratio_d_taps_over_a_taps_onnx": round(med["d"] / med["a_taps_onnx"], 3),
        "ratio_b_over_c": round(med["b"] / med["c"], 3),
        "ratio_b_whole_over_b_loop": round(med["b_wall"] / med["b"], 3),
        "ratio_d_taps_over_b_no_taps": round(med["d"] / med["b"], 3),
        **(
            {
                "ratio_e_ray_over_b_local": round(med["e"] / med["b"], 3),
                "ratio_e_ray_over_b_local_whole_command": round(med["e_wall"] / med["b_wall"], 3),
                "ratio_e_ray_after_first_rows_over_b_local": round(med["e_steady"] / med["b"], 3),
                "e_ray_first_rows_seconds": spread["e_first_rows_s"],
            }
            if "e" in med
            else {}
        ),
        "ratio_f_decode_over_a_forward": round(med["f"] / med["a"], 3),
        "cpu_cores": os.cpu_count(),
        "ratios_use": "medians",
        "g_whole_command": {"images": args.whole_images, **whole},
        "peak_rss_mb_by_images": rss,
        "rss_input_size": args.rss_input_size,
    }
    result["goals"] = goals(result)
    path = write("extract_throughput", result, args.artifacts)
    for k, v in result.items():
        if k != "goals":
            print(f"{k:32s} {v}")
    print()
    for line in result["goals"]:
        print(line)
    print(f"-> {path}")


def _by_round(runs: dict, b: str, refs: list[str]) -> list[float]:
    """Each round's ``b`` over the fastest reference measured in the same round (next to it): how much of the
    spread of the medians' ratio is the machine's drift."""
    return [round(v / max(runs[k][r] for k in refs), 3) for r, v in enumerate(runs[b])]


RSS_GOAL_MB = 1500


def goals(result: dict) -> list[str]:
    """Each ratio beside its goal, and a line that cannot be missed when one falls short."""
    whole = result["g_whole_command"]
    checks = [
        ("extract loop / best raw forward (no taps)", result["ratio_b_over_best_a"], ">=", 0.90),
        ("extract loop / raw forward, default taps (ONNX)", result["ratio_d_taps_over_a_taps_onnx"], ">=", 0.90),
        ("cached whole command: loop / wall", whole["cached_conversion"]["loop_over_wall"], ">=", 0.80),
        ("peak RSS MB, first (converting) run", whole["uncached_conversion"]["peak_rss_mb"], "<=", RSS_GOAL_MB),
        ("peak RSS MB, cached run", whole["cached_conversion"]["peak_rss_mb"], "<=", RSS_GOAL_MB),
    ]
    lines = []
    for name, value, op, goal in checks:
        met = value >= goal if op == ">=" else value <= goal
        lines.append(f"{name:45s} {value:>9} (goal {op} {goal}){'' if met else '   <-- BELOW GOAL'}")
    return lines


if __name__ == "__main__":
    main()
