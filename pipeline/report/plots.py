"""The report's figures: accuracy vs training time, the learning curve, confusion matrices, Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import atomic_path
from pipeline.heads.registry import REGISTRY
from pipeline.report.tables import method_label, pareto_front


def save_figure(fig, path: Path) -> None:
    """Written beside ``path`` and renamed into place: an interrupted report never leaves half a PNG."""
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_x_axes(ax, xlabel: str, title: str, ylabel: str = "test accuracy") -> None:
    """The house style of an accuracy plot against a log-scaled x axis."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)


MARKERS = {"finetune": "*", "frozen_dense": "h", **{name: spec.marker for name, spec in REGISTRY.items()}}


def plot_accuracy_vs_time(table: pd.DataFrame, path: Path, dataset: str) -> None:
    plt = pyplot()
    fig = accuracy_vs_time_figure(table, dataset)
    save_figure(fig, path)
    plt.close(fig)


def accuracy_vs_time_figure(table: pd.DataFrame, dataset: str):
    """Heads crowd at the same cost (they share the extraction): adjustText moves their labels apart."""
    from adjustText import adjust_text

    plt = pyplot()
    ok = table[table["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(sorted(ok["backbone"].unique()))}
    fills = {"image": "full", "image+meta": "left", "image+meta_norm": "none"}
    labels = []
    for _, r in ok.iterrows():
        lo, hi = r.get("acc_ci_low", np.nan), r.get("acc_ci_high", np.nan)
        yerr = [[r["test_accuracy"] - lo], [hi - r["test_accuracy"]]] if np.isfinite(lo) else None
        ax.errorbar(
            r["total_seconds"],
            r["test_accuracy"],
            yerr=yerr,
            marker=MARKERS.get(r["method"], "D"),
            markersize=14 if r["method"] == "finetune" else 9,
            color=colours[r["backbone"]],
            fillstyle=fills.get(r["features"], "full"),
            linestyle="none",
            elinewidth=1,
            capsize=2,
            alpha=0.9,
        )
        label = method_label(r["method"], r["features"], r["layers"])
        labels.append(ax.text(r["total_seconds"], r["test_accuracy"], label, fontsize=7))
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
    log_x_axes(
        ax,
        "total training seconds (log scale; heads include feature extraction)",
        f"{dataset}: accuracy vs training time (bars: 95% bootstrap CI over test images)",
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    if labels:
        adjust_text(
            labels,
            x=ok["total_seconds"].to_numpy(float),  # keep off the markers too
            y=ok["test_accuracy"].to_numpy(float),
            ax=ax,
            expand=(1.2, 1.5),
            force_text=(0.5, 1.0),
            arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5},
        )
    return fig


def plot_confusion(pred: pd.DataFrame, class_names: list[str], path: Path, title: str) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = pyplot()
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
    save_figure(fig, path)
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
    plt = pyplot()
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
    save_figure(fig, path)
    plt.close(fig)
    return True


def plot_curve(curve: pd.DataFrame, path: Path, dataset: str) -> None:
    """Test accuracy (with 95% CI) and cost against training images, one line per method, log x."""
    plt = pyplot()
    fig, (acc_ax, sec_ax) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    backbones = sorted(curve["backbone"].unique())
    colours = {b: plt.cm.tab10(i % 10) for i, b in enumerate(backbones)}
    styles = ["-", "--", ":", "-."]
    for k, ((b, label), g) in enumerate(curve.groupby(["backbone", "label"], sort=False)):
        g = g.sort_values("n_train")
        method = g["method"].iloc[0]
        kw = dict(
            marker=MARKERS.get(method, "D"),
            color=colours[b] if len(backbones) > 1 else plt.cm.tab10(k % 10),
            linestyle=styles[k % len(styles)] if len(backbones) > 1 else "-",
            markersize=10 if method == "finetune" else 6,
            label=(f"{b} " if len(backbones) > 1 else "") + label,
        )
        yerr = [g["test_accuracy"] - g["acc_ci_low"], g["acc_ci_high"] - g["test_accuracy"]]
        acc_ax.errorbar(g["n_train"], g["test_accuracy"], yerr=yerr, capsize=2, elinewidth=1, **kw)
        sec_ax.plot(g["n_train"], g["total_seconds"], **kw)
    for ax in (acc_ax, sec_ax):
        ax.set_xscale("log")
        ax.set_xlabel("training images (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    sec_ax.set_yscale("log")
    acc_ax.set_ylabel("test accuracy (bars: 95% CI)")
    sec_ax.set_ylabel("training seconds (heads include extraction)")
    acc_ax.set_title(f"{dataset}: learning curve", fontsize=10)
    sec_ax.set_title("cost of each point", fontsize=10)
    acc_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
