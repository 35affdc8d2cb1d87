"""The fine-tune's learning-rate search against the truth it approximates.

For each training size (nested subsets of the prepared training split), the full fine-tune at every rate
of the grid, each trained to early stopping with no search; the best of them (by test accuracy: this is
the oracle the search tries to match) again with two more training seeds; and the searched fine-tune
(the default grid). Prints, per size, every fixed rate's val / test / epochs / seconds, the best rate's
mean ± sd over its seeds, and the searched run beside it: its choice, its test accuracy minus the best
fixed rate's mean, and its cost against the three full runs'.

Every run is an ordinary ``finetune`` under its own artifacts folder (``--root``/lr<rate>, .../searched),
so an interrupted benchmark resumes where it stopped and finished runs are reused.

Usage (the demo data, after `make data`; hours on 2 cores, run it in the background):
  python benchmarks/lr_search_truth.py --config benchmarks/fashion_mnist_112.toml \
      --fractions 0.125 0.25 0.5 1.0 --root artifacts/lr_truth
  python benchmarks/lr_search_truth.py --dataset elpv --fractions 0.5 1.0 --root artifacts/lr_truth_elpv
``--only fixed`` / ``--only searched`` runs one side (the table prints what exists).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write  # noqa: E402

GRID = (1e-5, 1e-4, 1e-3)


def _config(args, artifacts: Path, grid: tuple[float, ...]):
    from pipeline.config import resolve_config

    ns = argparse.Namespace(config=args.config, artifacts=str(artifacts))
    cfg = resolve_config(ns)
    cfg.data.dataset = args.dataset
    cfg.finetune.lr_grid = grid
    cfg.finetune.resume = True
    return cfg


def _rows(artifacts: Path, dataset: str):
    from pipeline.results import read_results, results_path

    path = results_path(artifacts, dataset)
    if not path.exists():
        return []
    table = read_results(path)
    return [r for _, r in table[table["method"] == "finetune"].iterrows()]


def _pick(rows, n: int, seed=None):
    """The row of ``n`` training images at the configured seed (``seed`` None) or at an extra training seed."""
    import pandas as pd

    for r in rows:
        if int(r["n_train"]) == n and (pd.isna(r["seed"]) if seed is None else r["seed"] == seed):
            return r
    return None


def _epochs(r) -> int:
    return int(sum(json.loads(r["params"])["epochs_run"]))


def _run(cfg, ds, n: int, n_full: int) -> None:
    from pipeline import finetune

    finetune.run(cfg, ds, n_subset=n if n < n_full else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--config", default=None)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    ap.add_argument("--rates", type=float, nargs="+", default=list(GRID))
    ap.add_argument("--seeds", type=int, default=3, help="training seeds of the best fixed rate")
    ap.add_argument("--root", default="artifacts/lr_truth")
    ap.add_argument("--only", choices=("fixed", "searched", "table"), default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the search's rungs and choice, as the CLI logs them

    from pipeline.curve import sizes
    from pipeline.data import from_config

    root = Path(args.root)
    base = _config(args, root / "searched", GRID)
    ds = from_config(base)
    n_full = len(ds.splits["train"])
    points = sorted(set(sizes(ds.splits["train"].labels, tuple(args.fractions), base.data.seed).values()))
    fixed = {lr: root / f"lr{lr:g}" for lr in args.rates}
    for n in points:
        if args.only in (None, "fixed"):
            for lr, where in fixed.items():
                _run(_config(args, where, (lr,)), ds, n, n_full)
            best = max(fixed, key=lambda lr: _pick(_rows(fixed[lr], ds.name), n)["test_accuracy"])
            cfg = _config(args, fixed[best], (best,))
            cfg.finetune.seeds = args.seeds
            _run(cfg, ds, n, n_full)
        if args.only in (None, "searched"):
            _run(base, ds, n, n_full)
    _table(args, ds.name, points, n_full, fixed, root)


def _table(args, dataset: str, points, n_full: int, fixed: dict, root: Path) -> None:
    out = []
    for n in points:
        n_row = n if n < n_full else n_full
        runs = {lr: _pick(_rows(where, dataset), n_row) for lr, where in fixed.items()}
        runs = {lr: r for lr, r in runs.items() if r is not None}
        line = {"n_train": n_row}
        for lr, r in runs.items():
            line[f"lr{lr:g}"] = {
                "val": round(float(r["val_accuracy"]), 4),
                "test": round(float(r["test_accuracy"]), 4),
                "epochs": _epochs(r),
                "seconds": round(float(r["train_seconds"]), 1),
            }
        if runs:
            best = max(runs, key=lambda lr: runs[lr]["test_accuracy"])
            rows = _rows(fixed[best], dataset)
            tests = [float(runs[best]["test_accuracy"])]
            extra = [_pick(rows, n_row, s) for s in range(1, args.seeds)]
            tests += [float(r["test_accuracy"]) for r in extra if r is not None]
            line["best_rate"] = best
            line["best_tests"] = [round(t, 4) for t in tests]
            line["best_mean"] = round(statistics.mean(tests), 4)
            line["best_sd"] = round(statistics.stdev(tests), 4) if len(tests) > 1 else None
            line["fixed_seconds_sum"] = round(sum(float(r["train_seconds"]) for r in runs.values()), 1)
        searched = _pick(_rows(root / "searched", dataset), n_row)
        if searched is not None:
            p = json.loads(searched["params"])
            line["searched"] = {
                "rate": p.get("learning_rate_finetune"),
                "val": round(float(searched["val_accuracy"]), 4),
                "test": round(float(searched["test_accuracy"]), 4),
                "epochs": _epochs(searched),
                "seconds": round(float(searched["train_seconds"]), 1),
                "search_seconds": round(float(searched["tune_seconds"]), 1),
            }
            if "best_mean" in line:
                line["searched_minus_best_mean_pt"] = round(100 * (line["searched"]["test"] - line["best_mean"]), 2)
                line["searched_cost_over_fixed_sum"] = round(line["searched"]["seconds"] / line["fixed_seconds_sum"], 3)
        out.append(line)
        print(json.dumps(line))
    print(f"-> {write('lr_search_truth_' + dataset, {'rows': out, 'cpu': machine()['cpu']}, str(root))}")


if __name__ == "__main__":
    main()
