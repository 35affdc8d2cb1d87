"""`make report`: accuracy vs training time, deltas vs fine-tuning, confusion matrices,
per-subgroup accuracy and Grad-CAM, as report.md + self-contained report.html.

Reads only what earlier stages wrote: the results table, per-image test
predictions, run records, the fine-tuned model and the dataset's metadata.
Methods that have not run are shown as such, not as errors.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import Config, HeadsConfig, library_versions, writable_dir
from pipeline.report_layers import layer_sections
from pipeline.results import head_name, read_results, results_path

log = logging.getLogger(__name__)

HEADS = ("ridge", "logreg", "linear_svm", "rbf_svm", "mlp", "knn", "linear_probe")  # table order
EXPECTED = HeadsConfig().heads  # shown as "not run" when missing: the default heads only
META_FEATURES = ("image+meta", "image+meta_norm")


# --- tables ----------------------------------------------------------------------------------


def ratio_text(ratio: float) -> str:
    """'412x faster' / '2.1x slower' from fine-tune seconds / method seconds."""
    if not np.isfinite(ratio) or ratio <= 0:
        return ""
    if ratio >= 1:
        return f"{ratio:,.0f}× faster" if ratio >= 10 else f"{ratio:.1f}× faster"
    inv = 1 / ratio
    return f"{inv:,.0f}× slower" if inv >= 10 else f"{inv:.1f}× slower"


def comparison_table(results: pd.DataFrame, with_meta: bool = False) -> pd.DataFrame:
    """One row per (backbone, method, features) with totals and deltas vs the fine-tuned baseline.

    A head's cost is its tuning + fit plus the feature extraction it needed; the
    fine-tune's cost is its training time (its forward passes are inside it).
    Missing methods appear with status 'not run'.
    """
    df = results.copy()
    if "layers" not in df.columns:
        df["layers"] = "last"
    df["layers"] = df["layers"].fillna("last")
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
    df["vs_finetune"] = [
        "" if not np.isfinite(d) else f"{d:+.1f} pt, {ratio_text(r)}" for d, r in zip(df["delta_pt"], df["time_ratio"])
    ]
    order = {m: i for i, m in enumerate(("finetune",) + HEADS)}
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
        "params",
    ]
    return df.reindex(columns=cols)


def pareto_front(table: pd.DataFrame) -> pd.DataFrame:
    """Runs no other run beats on both accuracy and total time."""
    ok = table[table["status"] == "ok"].sort_values(["total_seconds", "test_accuracy"], ascending=[True, False])
    front, best = [], -np.inf
    for i, row in ok.iterrows():
        if row["test_accuracy"] > best:
            front.append(i)
            best = row["test_accuracy"]
    return ok.loc[front]


def subgroup_accuracy(pred: pd.DataFrame, meta: pd.DataFrame, max_values: int = 12) -> pd.DataFrame:
    """Accuracy per value of every binary/categorical metadata column, worst first.

    ``pred`` has id, y_true, y_pred; ``meta`` is indexed by the same ids.
    """
    correct = (pred["y_true"] == pred["y_pred"]).to_numpy()
    overall = correct.mean()
    joined = meta.reindex(pred["id"])
    rows = []
    for col in joined.columns:
        values = joined[col]
        n_unique = values.nunique(dropna=True)
        if n_unique < 2 or n_unique > max_values:
            continue
        for value, idx in values.groupby(values, dropna=True).indices.items():
            c = correct[idx]
            rows.append(
                {
                    "column": str(col),
                    "value": value,
                    "n": len(idx),
                    "correct": int(c.sum()),
                    "wrong": int(len(idx) - c.sum()),
                    "accuracy": float(c.mean()),
                    "vs_overall_pt": float((c.mean() - overall) * 100),
                }
            )
    out = pd.DataFrame(rows, columns=["column", "value", "n", "correct", "wrong", "accuracy", "vs_overall_pt"])
    return out.sort_values(["vs_overall_pt", "column"]).reset_index(drop=True)


def per_class_table(pred: pd.DataFrame, class_names: list[str]) -> pd.DataFrame:
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(pred["y_true"], pred["y_pred"], labels=labels, zero_division=0)
    return pd.DataFrame({"class": class_names, "precision": p, "recall": r, "f1": f, "support": s})


# --- figures ---------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = {
    "finetune": "*",
    "ridge": "D",
    "linear_svm": "s",
    "rbf_svm": "o",
    "logreg": "^",
    "mlp": "P",
    "knn": "v",
    "linear_probe": "X",
}


def plot_accuracy_vs_time(table: pd.DataFrame, path: Path, dataset: str) -> None:
    plt = _plt()
    ok = table[table["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(sorted(ok["backbone"].unique()))}
    fills = {"image": "full", "image+meta": "left", "image+meta_norm": "none"}
    placed: dict[tuple, int] = {}
    for _, r in ok.iterrows():
        ax.plot(
            r["total_seconds"],
            r["test_accuracy"],
            marker=MARKERS.get(r["method"], "D"),
            markersize=14 if r["method"] == "finetune" else 9,
            color=colours[r["backbone"]],
            fillstyle=fills.get(r["features"], "full"),
            linestyle="none",
        )
        label = r["method"] + ("" if r.get("layers", "last") == "last" else f" @{r['layers']}")
        label += "" if r["features"] == "image" else f" ({r['features'].replace('image+', '')})"
        spot = (round(float(np.log10(r["total_seconds"])), 1), round(float(r["test_accuracy"]), 3))
        k = placed[spot] = placed.get(spot, -1) + 1  # stack the labels of coinciding points
        ax.annotate(
            label,
            (r["total_seconds"], r["test_accuracy"]),
            textcoords="offset points",
            xytext=(7, 4 - 9 * k),
            fontsize=7,
        )
    front = pareto_front(table)
    ax.plot(front["total_seconds"], front["test_accuracy"], "--", color="grey", linewidth=1, label="Pareto front")
    for b, c in colours.items():
        ax.plot([], [], "o", color=c, label=b)
    for m, mk in MARKERS.items():
        if (ok["method"] == m).any():
            ax.plot([], [], mk, color="black", fillstyle="none", label=m)
    if (ok["features"] != "image").any():
        for f, fill in fills.items():
            ax.plot([], [], "o", color="grey", fillstyle=fill, label=f"features: {f}")
    ax.set_xscale("log")
    ax.set_xlabel("total training seconds (log scale; heads include feature extraction)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{dataset}: accuracy vs training time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(pred: pd.DataFrame, class_names: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _plt()
    n = len(class_names)
    fig, axes = plt.subplots(1, 2, figsize=(6 + 1.1 * n, 3 + 0.5 * n), dpi=100)
    for ax, norm, sub in ((axes[0], None, "counts"), (axes[1], "true", "row-normalised")):
        ConfusionMatrixDisplay.from_predictions(
            pred["y_true"],
            pred["y_pred"],
            labels=list(range(n)),
            display_labels=class_names,
            normalize=norm,
            ax=ax,
            colorbar=False,
            xticks_rotation=45,
            values_format=".2f" if norm else "d",
        )
        ax.set_title(f"{title}: {sub}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def gradcam(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps (N, H, W in 0..1) of a fine-tuned model for its predicted class.

    The model is raw image -> [augmentation] -> preprocess -> backbone -> dropout -> head;
    we rerun the inference path with the backbone's last 4-D layer exposed.
    """
    import keras
    import tensorflow as tf

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    last = [layer for layer in base.layers if len(layer.output.shape) == 4][-1]
    inner = keras.Model(base.inputs, [last.output, base.output])
    pre, head = model.get_layer("preprocess"), model.get_layer("head")
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        conv, pooled = inner(pre(x), training=False)
        probs = head(pooled)
        cls = tf.argmax(probs, axis=1)
        score = tf.gather(probs, cls, axis=1, batch_dims=1)
    grads = tape.gradient(score, conv)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * conv, axis=-1))
    cam = cam / (tf.reduce_max(cam, axis=(1, 2), keepdims=True) + 1e-8)
    cam = tf.image.resize(cam[..., None], images.shape[1:3])[..., 0]
    return cam.numpy(), cls.numpy()


def plot_gradcam(
    model_path: Path, pred: pd.DataFrame, dataset_dir: Path, class_names: list[str], n: int, path: Path
) -> bool:
    import keras

    from pipeline.backbones import layers as _registered  # noqa: F401  (Preprocess must be registered)
    from pipeline.data import image_dataset

    right, wrong = pred[pred["y_true"] == pred["y_pred"]], pred[pred["y_true"] != pred["y_pred"]]
    right = right.sample(min(len(right), n - n // 2), random_state=0)  # seeded, spread over classes
    wrong = wrong.sample(min(len(wrong), n // 2), random_state=0)
    chosen = pd.concat([right, wrong])
    if chosen.empty:
        return False
    model = keras.models.load_model(model_path)
    size = int(model.input_shape[1])
    images = np.concatenate(
        [b[0].numpy() for b in image_dataset([str(dataset_dir / i) for i in chosen["id"]], size, 64)]
    )
    cams, cls = gradcam(model, images)
    plt = _plt()
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.2 * len(chosen), 2.7), dpi=100, squeeze=False)
    for ax, img, cam, (_, r), c in zip(axes[0], images, cams, chosen.iterrows(), cls):
        ax.imshow(img.astype(np.uint8))
        ax.imshow(cam, cmap="jet", alpha=0.4)
        ok = r["y_true"] == r["y_pred"]
        ax.set_title(
            f"{'✓' if ok else '✗'} {class_names[c]}\n(true: {r['true']})", fontsize=7, color="green" if ok else "red"
        )
        ax.axis("off")
    fig.suptitle("Grad-CAM of the fine-tuned model (predicted class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- rendering -------------------------------------------------------------------------------


def _fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, float):
        if "seconds" in col:
            return f"{v:,.1f}"
        if col.endswith("_pt"):
            return f"{v:+.1f}"
        if col == "time_ratio":
            return f"{v:,.1f}"
        return f"{v:.4f}"
    return str(v)


def md_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c], c).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines)


def html_table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r[c], c))}</td>" for c in df.columns) + "</tr>"
        for _, r in df.iterrows()
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _render(sections: list[tuple[str, object]], title: str, out_dir: Path) -> None:
    """sections: (heading, content) where content is str (markdown/plain), DataFrame, or Path (image)."""
    md = [f"# {title}", ""]
    ht = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 7px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:12px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, content in sections:
        if heading:
            md += [f"## {heading}", ""]
            ht.append(f"<h2>{html.escape(heading)}</h2>")
        if isinstance(content, pd.DataFrame):
            md += [md_table(content), ""]
            ht.append(html_table(content))
        elif isinstance(content, Path):
            md += [f"![{heading}]({content.name})", ""]
            data = base64.b64encode(content.read_bytes()).decode()
            ht.append(f"<img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
        elif isinstance(content, str) and content.startswith("```"):
            md += [content, ""]
            ht.append(f"<pre>{html.escape(content.strip('`').strip())}</pre>")
        else:
            md += [str(content), ""]
            ht.append(f"<p>{html.escape(str(content))}</p>")
    ht.append("</body></html>")
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    (out_dir / "report.html").write_text("\n".join(ht) + "\n")


class Evaluated(NamedTuple):
    """A model whose per-image test predictions the report analyses."""

    name: str
    pred: pd.DataFrame
    path: Path
    finetuned: str | None = None  # the backbone, for a fine-tuned model


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run(cfg: Config) -> Path:
    """Build artifacts/reports/<dataset>/ from whatever results exist."""
    dataset = cfg.dataset_name
    art = Path(cfg.artifacts)
    out_dir = writable_dir(art / "reports" / dataset)
    res = read_results(results_path(art, dataset))
    sections: list[tuple[str, object]] = []
    if res.empty:
        from pipeline.errors import PipelineError

        raise PipelineError(
            f"no results for {dataset} yet in {results_path(art, dataset)}: run `make svm` and/or `make finetune`"
        )

    meta = None
    if cfg.metadata_path is not None:
        from pipeline.data import load_dataset, load_metadata

        ds = load_dataset(cfg.dataset_dir, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
        meta = load_metadata(cfg.metadata_path, ds.all_ids(), cfg.data.id_column, ds.name)

    table = comparison_table(res, with_meta=meta is not None)
    table.to_csv(out_dir / "summary.csv", index=False)
    shown = table.drop(columns=["delta_pt", "time_ratio", "params"])
    sections.append(
        (
            "Comparison",
            "Test accuracy and cost of every method. Heads are charged tuning + final fit + "
            "feature extraction; the fine-tune its training time. Deltas are against the fine-tuned model of the "
            "same backbone: accuracy points and how many times faster.",
        )
    )
    sections.append(("", shown))
    plot = out_dir / "accuracy_vs_time.png"
    plot_accuracy_vs_time(table, plot, dataset)
    sections.append(("Accuracy vs training time", plot))
    sections += layer_sections(art / "heads" / dataset, out_dir)

    ok = table[table["status"] == "ok"]
    head_rows = ok[ok["method"] != "finetune"]
    best_head = head_rows.sort_values("val_accuracy", ascending=False).head(1)
    models: list[Evaluated] = []
    if len(best_head):
        b = best_head.iloc[0]
        name = head_name(b["method"], b["features"], b["layers"])
        p = art / "heads" / dataset / b["backbone"] / f"{name}.predictions.csv"
        if p.exists():
            models.append(Evaluated(f"best head by validation accuracy: {b['backbone']} {name}", pd.read_csv(p), p))
    for bb in ok[ok["method"] == "finetune"]["backbone"]:
        p = art / "models" / dataset / f"{bb}-finetuned.predictions.csv"
        if p.exists():
            models.append(Evaluated(f"fine-tuned {bb}", pd.read_csv(p), p, finetuned=bb))
    records = {m.name: _read_json(m.path.with_name(m.path.name.replace(".predictions.csv", ".json"))) for m in models}

    class_names = next((r["class_names"] for r in records.values() if r and "class_names" in r), None)
    class_names = class_names or _class_names_seen(models)
    for k, m in enumerate(models):
        png = out_dir / f"confusion_{k}_{'finetune' if m.finetuned else 'head'}.png"
        plot_confusion(m.pred, class_names, png, m.name)
        sections.append((f"Confusion matrices: {m.name}", png))
        sections.append((f"Per-class precision / recall / F1: {m.name}", per_class_table(m.pred, class_names)))

    if meta is not None:
        for m in models:
            sub = subgroup_accuracy(m.pred, meta, cfg.report.subgroup_max_values)
            overall = float((m.pred["y_true"] == m.pred["y_pred"]).mean())
            sections.append(
                (
                    f"Accuracy per metadata subgroup: {m.name} (overall {overall:.4f})",
                    sub if len(sub) else "no binary/categorical metadata columns",
                )
            )

    finetuned = [m for m in models if m.finetuned]
    if finetuned and cfg.report.gradcam_images > 0:
        m = finetuned[0]
        png = out_dir / "gradcam.png"
        model_file = art / "models" / dataset / f"{m.finetuned}-finetuned.keras"
        try:
            if model_file.exists() and plot_gradcam(
                model_file, m.pred, cfg.dataset_dir, class_names, cfg.report.gradcam_images, png
            ):
                sections.append(("Grad-CAM (fine-tuned model)", png))
        except (OSError, ValueError) as e:
            log.warning("warning: Grad-CAM skipped: %s", str(e).splitlines()[0])

    shown_records = {
        name: {"config": r.get("config"), "versions": r.get("versions"), "timestamp": r.get("timestamp")}
        for name, r in records.items()
        if r
    }
    shown_records["report"] = {"versions": library_versions()}
    sections.append(
        ("Configuration and library versions", "```\n" + json.dumps(shown_records, indent=2, default=str) + "\n```")
    )

    _render(sections, f"Transfer learning on {dataset}: frozen features + heads vs fine-tuning", out_dir)
    _print_summary(shown, out_dir)
    return out_dir / "report.html"


def _class_names_seen(models: list[Evaluated]) -> list[str]:
    """Fallback for run records without class names: the classes the predictions mention."""
    names: dict[int, str] = {}
    for m in models:
        names.update(dict(zip(m.pred["y_true"], m.pred["true"])))
        names.update(dict(zip(m.pred["y_pred"], m.pred["pred"])))
    return [names[i] for i in sorted(names)] if names else []


def _print_summary(shown: pd.DataFrame, out_dir: Path) -> None:
    cols = ["backbone", "method", "features", "layers", "test_accuracy", "total_seconds", "vs_finetune"]
    print()
    print(shown[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="not run"))
    print(f"\nreport: {out_dir / 'report.html'} (and report.md, summary.csv, accuracy_vs_time.png)")
