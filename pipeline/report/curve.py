"""The learning-curve section: which results form curves, and where fine-tuning starts to pay."""

from __future__ import annotations

import pandas as pd

from pipeline.report.stats import counts_ci, paired_correct, paired_delta_ci
from pipeline.report.tables import ci_text, method_label


def curve_points(results: pd.DataFrame) -> pd.DataFrame:
    """Image-feature results of every method run at two or more training-set sizes, with CIs."""
    if "n_train" not in results.columns or results.empty:
        return pd.DataFrame()
    df = results[(results["features"] == "image") & results["n_train"].notna()].copy()
    df["layers"] = df["layers"].fillna("last")
    df["label"] = [method_label(m, "image", la) for m, la in zip(df["method"], df["layers"])]
    sizes = df.groupby(["backbone", "label"])["n_train"].transform("nunique")
    df = df[sizes >= 2].copy()
    if df.empty:
        return df
    df["total_seconds"] = df["train_seconds"] + df["extract_seconds"].fillna(0.0)
    cis = [counts_ci(a, n) for a, n in zip(df["test_accuracy"], df["n_test"])]
    df["acc_ci_low"], df["acc_ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
    return df.sort_values(["backbone", "label", "n_train"]).reset_index(drop=True)


def where_finetuning_pays(curve: pd.DataFrame, load_pred) -> list[str]:
    """Per backbone: at each size the fine-tune ran, it against the best head there (by val), and the
    smallest size from which it is significantly better, if any. ``load_pred(row)`` -> predictions or None."""
    lines = []
    for b, g in curve.groupby("backbone"):
        ft = g[g["method"] == "finetune"].sort_values("n_train")
        heads = g[~g["method"].isin(("finetune", "frozen_dense"))]
        if ft.empty or heads.empty:
            continue
        parts, pays = [], None
        for _, f in ft.iterrows():
            at = heads[heads["n_train"] == f["n_train"]]
            if at.empty:
                continue
            h = at.sort_values("val_accuracy", ascending=False).iloc[0]
            delta = (f["test_accuracy"] - h["test_accuracy"]) * 100
            text = (
                f"{f['n_train']:,.0f} images: fine-tune {f['test_accuracy']:.4f} vs {h['label']} "
                f"{h['test_accuracy']:.4f} ({delta:+.1f} pt"
            )
            significant = False
            pf, ph = load_pred(f), load_pred(h)
            if pf is not None and ph is not None:
                _, lo, hi = paired_delta_ci(*paired_correct(pf, ph))
                text += f", 95% CI {ci_text(lo * 100, hi * 100, signed=True)}"
                significant = lo > 0
            parts.append(text + ")")
            if significant and pays is None:
                pays = f["n_train"]
        subject = f"{b}: fine-tuning" if curve["backbone"].nunique() > 1 else "Fine-tuning"
        if not parts:
            continue
        if pays is not None:
            head = (
                f"{subject} starts to pay at {pays:,.0f} training images (the smallest measured size where "
                "it beats the best frozen head beyond the 95% CI)."
            )
        else:
            head = f"{subject} does not significantly beat the best frozen head at any measured size."
        lines.append(head + " " + "; ".join(parts) + ".")
    return lines


def heads_only_note(curve: pd.DataFrame) -> str | None:
    if (curve["method"] == "finetune").any():
        return None
    return "No fine-tune on the curve yet: `make curve` fine-tunes at the smallest and largest sizes by default."
