"""Backtests of `make forecast`: forecasts of fine-tunes that were then run, beside the naive baselines.

Each case is a measured learning curve cut at a ladder: the fine-tunes below the target size are the
evidence, the fine-tune at the target is the truth. ``collect`` copies a case's measured points out of a
results table into ``benchmarks/forecast_cases.json`` (so the backtest reruns from the repo alone); ``run``
forecasts every case with the product's own code, the interval widened only by backtests of *other*
datasets (a case never calibrates itself), and prints per case: forecast, interval, measured, error,
covered, the fine-tune-vs-best-head call, the crossover, the cost forecast against the measured cost and
the forecast's own cost against the full fine-tune's — and the same errors for "last value carried forward"
(LCDB's last1) and the plain power law. ``run --write`` also rewrites the calibration the product ships
(``pipeline/forecast/backtests.csv``: every case's forecast and truth).

  python benchmarks/forecast_backtest.py collect --artifacts artifacts/lr_truth/searched --dataset fashion-mnist \
      --cache efficientnet_lite0@112px --ladder 375 750 1500 --target 3000 --name "demo 3,000 from <=1,500" \
      --group demo --source "..."
  python benchmarks/forecast_backtest.py run [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write  # noqa: E402

CASES = Path(__file__).with_name("forecast_cases.json")


def collect(args) -> None:
    from pipeline.forecast.evidence import gather
    from pipeline.results import read_results, results_path

    table = read_results(results_path(args.artifacts, args.dataset))
    backbone = args.cache.split("@")[0]
    ev = gather(table, backbone, args.cache, args.ladder, args.target)
    ft = table[(table["backbone"] == backbone) & (table["method"] == "finetune")]
    truth = ft[(ft["n_train"] == args.target) & ft["seed"].isna()]
    if len(truth):
        measured = {"acc": float(truth["test_accuracy"].iloc[0]), "seconds": float(truth["train_seconds"].iloc[0])}
    elif args.measured_accuracy is not None:  # measured elsewhere (the source says where)
        measured = {"acc": args.measured_accuracy, "seconds": args.measured_seconds}
    else:
        raise SystemExit(f"no fine-tune at {args.target} images in {args.artifacts}: give --measured-accuracy")
    case = {
        "name": args.name,
        "group": args.group,
        "source": args.source,
        "n_test": ev.n_test,
        "target": args.target,
        "max_epochs": args.max_epochs,
        "finetune": [
            {
                "n": int(n),
                "acc": float(a),
                **{
                    k: getattr(r, k)
                    for k in ("phase_one_seconds", "search_seconds", "phase_two_seconds", "phase_two_epochs")
                },
            }
            for (n, a), r in zip(zip(ev.finetune.n, ev.finetune.acc), ev.runs)
        ],  # fmt: skip
        "head": ev.head,
        "head_curve": [{"n": int(n), "acc": float(a)} for n, a in zip(ev.head_curve.n, ev.head_curve.acc)],
        "measured": measured,
        "measured_crossover": args.measured_crossover,
    }
    cases = [c for c in _load() if c["name"] != args.name] + [case]
    CASES.write_text(json.dumps(cases, indent=1) + "\n")
    print(f"{args.name}: {len(case['finetune'])} fine-tunes, truth {case['measured']['acc']:.4f} -> {CASES}")


def _load() -> list[dict]:
    return json.loads(CASES.read_text()) if CASES.exists() else []


def _evidence(case: dict):
    from pipeline.forecast.cost import Run
    from pipeline.forecast.curves import Points
    from pipeline.forecast.evidence import Evidence, seed_noise, seed_sd_at

    ft = case["finetune"]
    n, acc = np.array([p["n"] for p in ft], float), np.array([p["acc"] for p in ft])
    seed_sd, seed_n = seed_noise(n, acc)
    if not np.isfinite(seed_sd):  # no size with two seeds: the case says whose spread it borrows, and where
        seed_sd, seed_n = case["seed_sd_borrowed"], case["seed_sd_borrowed_at"]
    sd = np.sqrt(acc * (1 - acc) / case["n_test"] + seed_sd_at(n, seed_sd, seed_n) ** 2)
    hn, ha = np.array([p["n"] for p in case["head_curve"]], float), np.array([p["acc"] for p in case["head_curve"]])
    runs = [Run(p["n"], p["phase_one_seconds"], p["search_seconds"], p["phase_two_seconds"], p["phase_two_epochs"])
            for p in ft if "phase_two_epochs" in p]  # fmt: skip
    return Evidence(
        finetune=Points(n, acc, sd),
        seed_sd=seed_sd,
        seed_n=seed_n,
        n_test=case["n_test"],
        runs=runs or [Run(int(n.max()), 0.0, 0.0, 1.0, 1)],
        head=case["head"],
        head_curve=Points(hn, ha, np.sqrt(ha * (1 - ha) / case["n_test"])),
        forecast_seconds=float(sum(r.seconds for r in runs)) if runs else math.nan,
        measured_full=case["measured"]["acc"],
    )


def evaluate(case: dict, cases_for_calibration) -> dict:
    from pipeline.forecast.curves import last_value, plain_power_law
    from pipeline.forecast.decide import forecast

    ev = _evidence(case)
    target, truth = case["target"], case["measured"]["acc"]
    kw = dict(dataset=case["group"], backbone="", target=target, n_full=target, max_epochs=case["max_epochs"])
    f = forecast(ev, cases=cases_for_calibration, **kw)
    head = float(ev.head_curve.at(target).mean())
    measured_seconds = case["measured"].get("seconds")
    has_cost = any("phase_two_epochs" in p for p in case["finetune"])
    return {
        "case": case["name"],
        "group": case["group"],
        "ratio": f.ratio,
        "sizes": f.measured_sizes,
        "forecast": f.accuracy,
        "low": f.low,
        "high": f.high,
        "measured": truth,
        "error_pt": (truth - f.accuracy) * 100,
        "covered": bool(f.low <= truth <= f.high),
        "status": f.status,
        "head": f"{case['head']} {head:.4f}",
        "decided": f.decided,  # "cannot tell yet" is no call; the lean (P > 1/2) is judged either way
        "call_right": bool((f.p_beats_head > 0.5) == (truth > head)),
        "p_beats_head": f.p_beats_head,
        "crossover": [f.crossover_n, f.crossover_low, f.crossover_high],
        "measured_crossover": case.get("measured_crossover"),
        "last1_error_pt": (truth - last_value(ev.finetune)) * 100,
        "plain_error_pt": (truth - plain_power_law(ev.finetune, target)) * 100,
        "cost_forecast_over_measured": f.cost_seconds / measured_seconds if has_cost and measured_seconds else None,
        "forecast_cost_over_full": ev.forecast_seconds / measured_seconds if has_cost and measured_seconds else None,
        "calibrated_with": len(cases_for_calibration),
    }


def _table(rows: list[dict]) -> str:
    def pt(v):
        return "" if v is None else f"{v:+.2f}"

    def pct(v):
        return "n/a" if v is None else f"{v:.0%}"

    lines = [
        "| case | ratio | forecast (90%) | measured | error pt | covered | call vs best head | last1 pt | plain pt "
        "| cost fc/meas | forecast cost / full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lean = "right" if r["call_right"] else "WRONG"
        call = f"{lean} (P {r['p_beats_head']:.2f}{'' if r['decided'] else ', cannot tell'})"
        lines.append(
            f"| {r['case']} | {r['ratio']:.1f}× | {r['forecast']:.4f} ({r['low']:.3f} … {r['high']:.3f}) | "
            f"{r['measured']:.4f} | {pt(r['error_pt'])} | {'yes' if r['covered'] else 'NO'} | {call} | "
            f"{pt(r['last1_error_pt'])} | {pt(r['plain_error_pt'])} | {pct(r['cost_forecast_over_measured'])} | "
            f"{pct(r['forecast_cost_over_full'])} |"
        )
    return "\n".join(lines)


def run(args) -> None:
    from pipeline.forecast import calibration

    cases = _load()
    own = {c["name"]: evaluate(c, []) for c in cases}  # point forecasts do not depend on the calibration
    shipped = [calibration.Case(c["name"], c["target"], max(p["n"] for p in c["finetune"]), own[c["name"]]["forecast"],
                                c["measured"]["acc"]) for c in cases]  # fmt: skip
    rows = []
    for c in cases:
        others = [s for s, k in zip(shipped, cases) if k["group"] != c["group"]]
        rows.append(evaluate(c, others))
    print(_table(rows))
    near = [r for r in rows if round(r["ratio"], 1) <= 5]
    called = [r for r in rows if r["decided"]]
    mae = {k: float(np.mean([abs(r[k]) for r in rows])) for k in ("error_pt", "last1_error_pt", "plain_error_pt")}
    summary = {
        "cases": len(rows),
        "covered": f"{sum(r['covered'] for r in rows)} of {len(rows)}",
        "mean_abs_error_pt": mae,
        "within_1pt_at_le_5x": f"{sum(abs(r['error_pt']) <= 1.0 for r in near)} of {len(near)}",
        "leans_right": f"{sum(r['call_right'] for r in rows)} of {len(rows)}",
        "decided_and_right": f"{sum(r['call_right'] for r in called)} of {len(called)} decided",
    }
    print(json.dumps(summary, indent=1))
    print("written", write("forecast_backtest", {"rows": rows, "summary": summary}, args.out))
    if args.write:
        calibration.write_cases(shipped)
        print("calibration written:", calibration.BACKTESTS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--artifacts", required=True)
    c.add_argument("--dataset", required=True)
    c.add_argument("--cache", required=True, help="the heads' cache variant, e.g. efficientnet_lite0@112px")
    c.add_argument("--ladder", type=int, nargs="+", required=True)
    c.add_argument("--target", type=int, required=True)
    c.add_argument("--name", required=True)
    c.add_argument("--group", required=True, help="cases of one group never calibrate each other")
    c.add_argument("--source", required=True)
    c.add_argument("--max-epochs", type=int, default=30)
    c.add_argument("--measured-crossover", default=None)
    c.add_argument("--measured-accuracy", type=float, default=None)
    c.add_argument("--measured-seconds", type=float, default=None)
    r = sub.add_parser("run")
    r.add_argument("--write", action="store_true")
    r.add_argument("--out", default="artifacts")
    args = p.parse_args()
    (collect if args.command == "collect" else run)(args)


if __name__ == "__main__":
    main()
