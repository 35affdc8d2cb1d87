"""The report's tables: every method against its backbone's fine-tune, the Pareto front, the best
per backbone, per-class scores and accuracy per metadata subgroup. Pure pandas, no plotting."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline.config import HeadsConfig
from pipeline.heads.registry import REGISTRY
from pipeline.report.stats import unpaired, wilson
from pipeline.results import FINETUNED, extra_seed

EXPECTED = HeadsConfig().heads  # shown as "not run" when missing: the default heads only
META_FEATURES = ("image+meta", "image+meta_norm")
SMALL_SUBGROUP = 20


def ratio_text(ratio: float) -> str:
    """'N× faster' / 'N× slower' from fine-tune seconds / method seconds."""
    if not np.isfinite(ratio) or ratio <= 0:
        return ""
    if ratio >= 1:
        return f"{ratio:,.0f}× faster" if ratio >= 10 else f"{ratio:.1f}× faster"
    inv = 1 / ratio
    return f"{inv:,.0f}× slower" if inv >= 10 else f"{inv:.1f}× slower"


def method_label(method: str, features: str = "image", layers: str = "last") -> str:
    """'logreg @all + meta_norm': the method, its layer set and its feature set in one short name."""
    label = method + ("" if layers in ("last", "", None) or pd.isna(layers) else f" @{layers}")
    return label + ("" if features == "image" else f" + {str(features).replace('image+', '')}")


def largest_runs(results: pd.DataFrame) -> pd.DataFrame:
    """Each (backbone, method, features, layers) at its largest training set: the main comparison. A fine-tune
    run only on smaller subsets than the heads (the curve's or the forecast's) is not compared with them: it
    would set a smaller training set against a larger one. Smaller points stay in the results for the curve."""
    df = results.copy()
    if "layers" not in df.columns:
        df["layers"] = "last"
    df["layers"] = df["layers"].fillna("last")
    if "n_train" not in df.columns:
        df["n_train"] = np.nan
    size = df["n_train"].fillna(0)
    keep = size == size.groupby([df[k] for k in ("backbone", "method", "features", "layers")]).transform("max")
    keep &= ~df["method"].isin(FINETUNED) | (size == size.groupby(df["backbone"]).transform("max"))
    return df[keep]


def beside_their_finetune(results: pd.DataFrame) -> pd.DataFrame:
    """Heads are filed under their cache's label, ``backbone@variant``; each variant is compared with its
    backbone's fine-tune as a backbone is: the fine-tune's rows are repeated under every variant label
    without fine-tune rows of its own, and a backbone whose heads all sit in variants is shown through them."""
    label = results["backbone"].astype(str)
    tuned = results["method"].isin(FINETUNED)
    variant_labels = sorted(set(label[label.str.contains("@") & ~tuned]))
    extra = []
    for lab in variant_labels:
        if (tuned & (label == lab)).any():
            continue
        rows = results[tuned & (label == lab.split("@")[0])]
        if len(rows):
            extra.append(rows.assign(backbone=lab))
    if not extra:
        return results
    plain_heads = set(label[~tuned])
    shown_through = {lab.split("@")[0] for lab in variant_labels} - plain_heads
    keep = ~(tuned & label.isin(shown_through))
    return pd.concat([results[keep], *extra], ignore_index=True)


SPREAD_COLUMNS = ["backbone", "n_train", "seeds", "mean", "sd", "min", "max", "accuracies"]


def seed_spread(results: pd.DataFrame) -> pd.DataFrame:
    """Per backbone, the fine-tune's test accuracy over its training seeds at the largest training set that has
    several: the configured seed's row and the ``--seeds`` extra rows (the verdict quotes it only when that is
    the compared size)."""
    rows = []
    for (backbone, n), group in results[results["method"] == "finetune"].groupby(["backbone", "n_train"]):
        if not extra_seed(group).any():
            continue
        group = group.sort_values("seed", na_position="first")  # the configured seed first
        accs = group["test_accuracy"].to_numpy()
        names = [" (configured seed)" if pd.isna(s) else f" (seed {int(s)})" for s in group["seed"]]
        rows.append(
            {
                "backbone": backbone,
                "n_train": n,
                "seeds": len(accs),
                "mean": float(accs.mean()),
                "sd": float(accs.std(ddof=1)),
                "min": float(accs.min()),
                "max": float(accs.max()),
                "accuracies": ", ".join(f"{a:.4f}{name}" for a, name in zip(accs, names, strict=True)),
            }
        )
    spread = pd.DataFrame(rows, columns=SPREAD_COLUMNS)
    largest = spread["n_train"] == spread.groupby("backbone")["n_train"].transform("max")  # the compared size
    return spread[largest].reset_index(drop=True)


def seed_table(spread: pd.DataFrame) -> pd.DataFrame:
    """The seed spread as the report shows it."""
    return pd.DataFrame(
        {
            "backbone": spread["backbone"],
            "training images": spread["n_train"].map(lambda n: f"{n:,.0f}"),
            "seeds": spread["seeds"],
            "test accuracy mean ± sd": [f"{m:.4f} ± {s:.4f}" for m, s in zip(spread["mean"], spread["sd"])],
            "min – max": [f"{a:.4f} – {b:.4f}" for a, b in zip(spread["min"], spread["max"])],
            "each seed": spread["accuracies"],
        }
    )


def comparison_table(results: pd.DataFrame, with_meta: bool = False) -> pd.DataFrame:
    """One row per (backbone, method, features, layers) with totals and deltas vs the fine-tuned baseline.

    A head's cost is its tuning + fit plus the feature extraction it needed; the
    fine-tune's (and frozen_dense's) cost is its training time (its forward passes are inside it).
    Missing methods appear with status 'not run'.
    """
    df = largest_runs(results)
    df["extract_seconds"] = df["extract_seconds"].fillna(0.0)
    df["total_seconds"] = df["train_seconds"] + df["extract_seconds"]
    df["status"] = "ok"
    expected = [("finetune", "image")] + [(h, "image") for h in EXPECTED]
    if with_meta or df["features"].isin(META_FEATURES).any():
        expected += [(h, f) for f in META_FEATURES for h in EXPECTED]
    missing = [
        {"backbone": b, "method": m, "features": f, "layers": "last", "status": "not run"}
        for b in df["backbone"].unique()
        for m, f in expected
        if not ((df["backbone"] == b) & (df["method"] == m) & (df["features"] == f)).any()
    ]
    if missing:
        df = pd.concat([df, pd.DataFrame(missing)], ignore_index=True)
    ft = df[(df["method"] == "finetune") & (df["status"] == "ok")].set_index("backbone")
    base_acc = df["backbone"].map(ft["test_accuracy"])
    base_sec = df["backbone"].map(ft["total_seconds"])
    df["delta_pt"] = (df["test_accuracy"] - base_acc) * 100
    df["time_ratio"] = base_sec / df["total_seconds"]
    df.loc[df["method"] == "finetune", ["delta_pt", "time_ratio"]] = np.nan
    df["vs_finetune"] = vs_finetune(df)
    order = {m: i for i, m in enumerate(FINETUNED + tuple(REGISTRY))}
    df["_m"] = df["method"].map(order).fillna(99)
    df["_f"] = df["features"].map({"image": 0, "image+meta": 1, "image+meta_norm": 2}).fillna(9)
    df["_l"] = (df["layers"] != "last").astype(int)
    df = df.sort_values(["backbone", "_f", "_l", "_m"]).drop(columns=["_m", "_f", "_l"]).reset_index(drop=True)
    cols = [
        "backbone",
        "method",
        "features",
        "layers",
        "status",
        "n_train",
        "test_accuracy",
        "val_accuracy",
        "test_balanced_accuracy",
        "test_macro_f1",
        "train_seconds",
        "extract_seconds",
        "total_seconds",
        "delta_pt",
        "time_ratio",
        "vs_finetune",
        "n_test",
        "params",
        "predictions",
    ]
    return df.reindex(columns=cols)


def vs_finetune(df: pd.DataFrame) -> list[str]:
    """'+D pt, N× faster' per row (again after the paired Δ replaces the unpaired one)."""
    return [
        "" if not np.isfinite(d) else f"{d:+.1f} pt, {ratio_text(r)}" for d, r in zip(df["delta_pt"], df["time_ratio"])
    ]


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Runs no other run beats on both accuracy and total time."""
    ok = table[table["status"] == "ok"].sort_values(["total_seconds", "test_accuracy"], ascending=[True, False])
    front, best = [], -np.inf
    for i, row in ok.iterrows():
        if row["test_accuracy"] > best:
            front.append(i)
            best = row["test_accuracy"]
    return ok.loc[front]


def best_head(table: pd.DataFrame, backbone: str | None = None) -> pd.Series | None:
    """The cached-feature head a user would pick: best by validation accuracy (test is for reporting)."""
    ok = table[(table["status"] == "ok") & ~table["method"].isin(FINETUNED)]
    if backbone is not None:
        ok = ok[ok["backbone"] == backbone]
    if ok.empty:
        return None
    return ok.sort_values(["val_accuracy", "total_seconds"], ascending=[False, True]).iloc[0]


def ci_text(lo, hi, signed: bool = False) -> str:
    """'low … high' for an accuracy, signed for a difference in points; '' when unknown."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    f = "{:+.1f}" if signed else "{:.3f}"
    return f"{f.format(lo)} … {f.format(hi)}"


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The main table as a reader wants it: few columns, human headers, the answer (Δ) next to accuracy."""
    rows = []
    for _, r in table.iterrows():
        ok = r["status"] == "ok"
        delta = r.get("delta_pt", np.nan)
        rows.append(
            {
                "Backbone": r["backbone"],
                "Method": method_label(r["method"], r["features"], r["layers"]),
                "Test accuracy": f"{r['test_accuracy']:.4f}" if ok else "not run",
                "95% CI": ci_text(r.get("acc_ci_low", np.nan), r.get("acc_ci_high", np.nan)),
                "Δ vs fine-tune (pt)": _delta_text(r) if ok and np.isfinite(delta) else "",
                "Δ 95% CI": ci_text(r.get("delta_ci_low", np.nan), r.get("delta_ci_high", np.nan), signed=True),
                "Time (s)": f"{r['total_seconds']:,.1f}" if ok else "",
                "Cost vs fine-tune": ratio_text(r.get("time_ratio", np.nan)) if ok else "",
            }
        )
    return pd.DataFrame(rows)


def _delta_text(r: pd.Series) -> str:
    """'+1.20', and on how many images when the method scored others than the fine-tune did."""
    text = f"{r['delta_pt']:+.2f}"
    return text + f" (on {r['n_paired']:,.0f} paired)" if unpaired(r) else text


def _short_params(params) -> str:
    try:
        p = json.loads(params)
    except (TypeError, ValueError):
        return ""
    p.pop("layers", None)
    p.pop("version", None)  # the params record's format, not a setting
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())


def details_table(table: pd.DataFrame) -> pd.DataFrame:
    """Everything else about each run that finished."""
    ok = table[table["status"] == "ok"]
    return pd.DataFrame(
        {
            "Backbone": ok["backbone"],
            "Method": [method_label(m, f, la) for m, f, la in zip(ok["method"], ok["features"], ok["layers"])],
            "Train images": ok["n_train"].map(lambda v: f"{v:,.0f}" if np.isfinite(v) else ""),
            "Val acc": ok["val_accuracy"].map("{:.4f}".format),
            "Balanced acc": ok["test_balanced_accuracy"].map(lambda v: f"{v:.4f}" if np.isfinite(v) else ""),
            "Macro F1": ok["test_macro_f1"].map(lambda v: f"{v:.4f}" if np.isfinite(v) else ""),
            "Train s": ok["train_seconds"].map("{:,.1f}".format),
            "Extract s": ok["extract_seconds"].map("{:,.1f}".format),
            "McNemar p": ok.get("mcnemar_p", pd.Series(np.nan, ok.index)).map(
                lambda v: f"{v:.3g}" if np.isfinite(v) else ""
            ),
            "Settings": ok["params"].map(_short_params),
        }
    )


def best_per_backbone(table: pd.DataFrame) -> pd.DataFrame:
    """One row per backbone: its best head by validation accuracy, and its fine-tune when there is one."""
    rows = []
    for b in sorted(table["backbone"].unique()):
        head = best_head(table, b)
        ft = table[(table["backbone"] == b) & (table["method"] == "finetune") & (table["status"] == "ok")]
        row = {"Backbone": b, "Best head (by val)": "", "Head test acc": "", "Head time (s)": ""}
        if head is not None:
            row.update(
                {
                    "Best head (by val)": method_label(head["method"], head["features"], head["layers"]),
                    "Head test acc": f"{head['test_accuracy']:.4f}",
                    "Head time (s)": f"{head['total_seconds']:,.1f}",
                }
            )
        row["Fine-tune test acc"] = f"{ft['test_accuracy'].iloc[0]:.4f}" if len(ft) else "not run"
        row["Δ (pt)"] = f"{head['delta_pt']:+.2f}" if head is not None and np.isfinite(head["delta_pt"]) else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _groups(values: pd.Series, max_values: int) -> pd.Series | None:
    """Subgroup labels of one metadata column: its values, quartile bins for a many-valued numeric
    column, '(missing)' for missing values; None when the column cannot form subgroups."""
    present = values.dropna()
    n_unique = present.nunique()
    numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if numeric and n_unique > 4:
        bins = pd.qcut(present, 4, duplicates="drop")
        labels = bins.astype(str).map(lambda s: s.replace("(", "[", 1) if s.startswith("(") else s)
        groups = pd.Series(labels, index=present.index).reindex(values.index)
    elif 2 <= n_unique <= max_values or (n_unique == 1 and values.isna().any()):
        groups = values.astype(object)
    else:
        return None
    return groups.where(values.notna(), "(missing)")


def subgroup_accuracy(pred: pd.DataFrame, meta: pd.DataFrame, max_values: int = 12) -> pd.DataFrame:
    """Accuracy per subgroup of every metadata column, worst first, each with its 95% Wilson interval;
    subgroups under 20 images are flagged (their accuracy says little).

    ``pred`` has id, y_true, y_pred; ``meta`` is indexed by the same ids."""
    correct = (pred["y_true"] == pred["y_pred"]).to_numpy()
    overall = correct.mean()
    joined = meta.reindex(pred["id"].astype(str))
    rows = []
    for col in joined.columns:
        groups = _groups(joined[col], max_values)
        if groups is None:
            continue
        for value, idx in groups.groupby(groups.to_numpy(), sort=True).indices.items():
            c = correct[idx]
            lo, hi = wilson(int(c.sum()), len(idx))
            rows.append(
                {
                    "column": str(col),
                    "value": value,
                    "n": len(idx),
                    "correct": int(c.sum()),
                    "wrong": int(len(idx) - c.sum()),
                    "accuracy": float(c.mean()),
                    "ci_low": lo,
                    "ci_high": hi,
                    "vs_overall_pt": float((c.mean() - overall) * 100),
                    "note": f"small (n < {SMALL_SUBGROUP})" if len(idx) < SMALL_SUBGROUP else "",
                }
            )
    cols = ["column", "value", "n", "correct", "wrong", "accuracy", "ci_low", "ci_high", "vs_overall_pt", "note"]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["vs_overall_pt", "column"]).reset_index(drop=True)


def per_class_table(pred: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(pred["y_true"], pred["y_pred"], labels=labels, zero_division=0)
    return pd.DataFrame({"class": class_names, "precision": p, "recall": r, "f1": f, "support": s})
