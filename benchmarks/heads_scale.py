"""Heads at scale: fit seconds, peak RSS and val/test accuracy per head on caches of growing size.

Synthetic class-structured caches (10 classes whose centres lie in a 64-d subspace, plus isotropic
noise; well separated, so they measure cost, not accuracy: accuracy comes from the real cache) are
written chunk by chunk in extract's layout, with
10,000 val and 10,000 test rows at every size; each head runs in its own process through the real
`heads` stage so its peak RSS is its own. The real full Fashion-MNIST cache is measured too when
present (--real). Example:

    python benchmarks/heads_scale.py --sizes 50000 200000 1000000 --heads linear_probe
    python benchmarks/heads_scale.py --sizes 50000 --heads ridge logreg linear_svm rbf_svm

Prints one line per (cache, head) and the ratio the heads issue asks for: linear_probe's peak RSS at
the largest size / at the smallest.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLASSES = [f"c{i}" for i in range(10)]


def write_cache(path: Path, n_train: int, width: int, seed: int = 0) -> None:
    """A complete synthetic cache, written through the pipeline's cache writer chunk by chunk (never held
    whole in memory)."""
    from pipeline.extract.cache.writer import CacheWriter

    if path.exists():
        return
    rng = np.random.default_rng(seed)
    basis = rng.normal(0, 1, (64, width)).astype(np.float32) / 8.0
    centres = rng.normal(0, 1, (10, 64)).astype(np.float32)
    sizes = {"train": n_train, "val": 10000, "test": 10000}
    w = CacheWriter(path, {}, width, [])
    for split, n in sizes.items():
        y = rng.integers(0, 10, n)
        ids = [f"{split}/{i}.png" for i in range(n)]
        for s in range(0, n, 16384):
            k = min(16384, n - s)
            z = centres[y[s : s + k]] + rng.normal(0, 1.2, (k, 64)).astype(np.float32)
            X = np.maximum(z @ basis + rng.normal(0, 0.5, (k, width)).astype(np.float32), 0)
            w.append(split, X, y[s : s + k], ids[s : s + k], s + k)
    w.finish_pass({split: [f"{split}/{i}.png" for i in range(n)] for split, n in sizes.items()})
    w.complete(
        backbone="synthetic", class_names=json.dumps(CLASSES), extract_seconds=0.0, weights="synthetic (benchmark)"
    )


def child(args) -> None:
    """One head through the real heads stage; prints a JSON line with its own peak RSS."""
    sys.path.insert(0, str(ROOT))
    from pipeline import heads
    from pipeline.config import Config
    from pipeline.errors import PipelineError

    cfg = Config()
    cfg.artifacts = args.artifacts
    cfg.data.dataset = args.dataset
    cfg.backbone.backbone = args.backbone
    cfg.heads.heads = (args.child,)
    cfg.heads.layers = tuple(args.layers)
    cfg.heads.memory_budget = args.memory_budget
    t0 = time.perf_counter()
    try:
        out = heads.run(cfg)
        rows = [
            {
                "layers": r.layers,
                "val": round(r.val_accuracy, 4),
                "test": round(r.scores["test_accuracy"], 4),
                "train_s": round(r.tune_seconds + r.fit_seconds, 1),
            }
            for r in out
        ]
        err = None
    except PipelineError as e:
        rows, err = [], str(e)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        "RESULT "
        + json.dumps(
            {"rows": rows, "peak_rss_mb": round(peak), "wall_s": round(time.perf_counter() - t0, 1), "error": err}
        )
    )


def run_head(head: str, dataset: Path, artifacts: Path, backbone: str, layers, budget) -> dict:
    cmd = [sys.executable, __file__, "--child", head, "--dataset", str(dataset), "--artifacts", str(artifacts)]
    cmd += ["--backbone", backbone, "--layers", *layers] + (["--memory-budget", budget] if budget else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"rows": [], "peak_rss_mb": None, "wall_s": None, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[50000, 200000], help="training rows per synthetic cache")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--heads", nargs="+", default=["ridge", "logreg", "linear_svm", "rbf_svm", "linear_probe"])
    ap.add_argument("--work", default="artifacts/bench/heads_scale", help="where the synthetic caches go")
    ap.add_argument("--real", default="artifacts/full", help="artifacts folder of the full Fashion-MNIST run, if any")
    ap.add_argument("--memory-budget", default=None)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dataset", help=argparse.SUPPRESS)
    ap.add_argument("--artifacts", help=argparse.SUPPRESS)
    ap.add_argument("--backbone", default="synthetic", help=argparse.SUPPRESS)
    ap.add_argument("--layers", nargs="+", default=["last"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    work = (ROOT / args.work).resolve()
    cases = []
    for n in args.sizes:
        name = f"synthetic-{n}"
        cache = work / "features" / name / "synthetic.h5"
        t0 = time.perf_counter()
        write_cache(cache, n, args.width)
        (work / "data" / name).mkdir(parents=True, exist_ok=True)
        mb = cache.stat().st_size / 2**20
        print(f"{name}: {n:,} x {args.width} float32 cache {mb:,.0f} MB (ready in {time.perf_counter() - t0:.0f}s)")
        cases.append((name, work / "data" / name, work, "synthetic", ["last"], mb))
    real = (ROOT / args.real).resolve()
    real_cache = real / "features" / "fashion-mnist" / "efficientnet_lite0.h5"
    if real_cache.exists():
        mb = real_cache.stat().st_size / 2**20
        cases.append(
            (
                "fashion-mnist (full, 112 px)",
                ROOT / "data" / "full" / "fashion-mnist",
                real,
                "efficientnet_lite0",
                ["last", "all"],
                mb,
            )
        )

    report = []
    cols = f"{'layers':7s} {'val':>7s} {'test':>7s} {'train s':>8s} {'peak RSS MB':>12s} {'x cache':>8s}"
    print(f"\n{'cache':30s} {'head':13s} {cols}")
    for name, data, artifacts, backbone, layers, mb in cases:
        for head in args.heads:
            r = run_head(head, data, artifacts, backbone, layers, args.memory_budget)
            if r["error"]:
                print(f"{name:30s} {head:13s} refused/failed: {r['error']}")
            for row in r["rows"]:
                scores = f"{row['val']:7.4f} {row['test']:7.4f} {row['train_s']:8.1f}"
                rss = f"{r['peak_rss_mb']:12,d} {r['peak_rss_mb'] / mb:8.2f}"
                print(f"{name:30s} {head:13s} {row['layers']:7s} {scores} {rss}")
            report.append({"cache": name, "cache_mb": round(mb), "head": head, **r})
    probe = [r for r in report if r["head"] == "linear_probe" and r["cache"].startswith("synthetic")]
    probe = [r for r in probe if r["peak_rss_mb"]]
    if len(probe) > 1:
        big, small = probe[-1], probe[0]
        print(
            f"\nlinear_probe peak RSS {big['cache']} / {small['cache']}: "
            f"{big['peak_rss_mb'] / small['peak_rss_mb']:.2f}"
            f" (cache {big['cache_mb'] / small['cache_mb']:.1f}x larger)"
        )
    out = ROOT / "artifacts" / "bench" / "heads_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"(written to {out})")


if __name__ == "__main__":
    main()
