"""Fine-tune seconds / head-fit seconds and the accuracy gap, from the results table.

Reads artifacts/results/<dataset>.csv (run `make svm` and `make finetune` first) and
prints, per head, how many times cheaper it was than the fine-tune (training time
alone, and with feature extraction charged) and the test-accuracy gap in points.
Usage: python benchmarks/heads_vs_finetune.py [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--artifacts", default="artifacts")
    args = ap.parse_args()

    from pipeline.report.tables import beside_their_finetune, largest_runs
    from pipeline.results import read_results, results_path

    table = largest_runs(beside_their_finetune(read_results(results_path(args.artifacts, args.dataset))))
    rows = []
    for backbone, group in table.groupby("backbone"):
        ft = group[group["method"] == "finetune"]
        if ft.empty:
            print(f"{backbone}: no finetune row yet (make finetune)", file=sys.stderr)
            continue
        ft = ft.iloc[0]
        for _, r in group[group["method"] != "finetune"].iterrows():
            total = r["train_seconds"] + r["extract_seconds"]
            rows.append(
                {
                    "backbone": backbone,
                    "head": r["method"],
                    "features": r["features"],
                    "layers": r["layers"],
                    "finetune_seconds": round(ft["train_seconds"], 1),
                    "head_train_seconds": round(r["train_seconds"], 2),
                    "head_total_seconds": round(total, 2),
                    "ratio_finetune_over_head_train": round(ft["train_seconds"] / r["train_seconds"], 1),
                    "ratio_finetune_over_head_total": round(ft["train_seconds"] / total, 2),
                    "accuracy_gap_pt": round((r["test_accuracy"] - ft["test_accuracy"]) * 100, 2),
                }
            )
    if not rows:
        sys.exit("no (head, finetune) pairs in the results table yet: run `make svm` and `make finetune`")
    for r in rows:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    print(f"-> {write('heads_vs_finetune', {'dataset': args.dataset, 'rows': rows}, args.artifacts)}")


if __name__ == "__main__":
    main()
