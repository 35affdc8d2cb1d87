"""Report section for layer sets: validation and test accuracy of each cached layer alone
(the scores ``--layers auto`` chose from) and the set it chose, per backbone.

Reads ``artifacts/heads/<dataset>/<backbone>@<variant>/layers.json``, written by the heads stage.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def plot_layer_scores(per_layer: pd.DataFrame, chosen: list[str], path: Path, title: str) -> None:
    from pipeline.report.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(per_layer) + 1.6), dpi=110)
    y = range(len(per_layer))
    labels = [f"{r.label} [{r.width}-dim]" + ("  (chosen)" * (r.layer in chosen)) for r in per_layer.itertuples()]
    ax.barh([i + 0.2 for i in y], per_layer["val_accuracy"], height=0.4, label="validation", color="#4c72b0")
    ax.barh([i - 0.2 for i in y], per_layer["test_accuracy"], height=0.4, label="test", color="#dd8452")
    ax.set_yticks(list(y), labels, fontsize=8)
    ax.invert_yaxis()
    lo = max(0.0, float(per_layer[["val_accuracy", "test_accuracy"]].min().min()) - 0.05)
    ax.set_xlim(lo, 1.0)
    ax.set_xlabel("accuracy of a ridge head on this layer alone")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def layer_sections(heads_dir: Path, out_dir: Path) -> list[tuple[str, object]]:
    sections: list[tuple[str, object]] = []
    for path in sorted(Path(heads_dir).glob("*/layers.json")):
        try:
            sel = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        backbone = path.parent.name
        per_layer = pd.DataFrame(sel.get("per_layer", []))
        if per_layer.empty:
            continue
        per_layer["label"] = per_layer.get("label", per_layer["layer"]).fillna(per_layer["layer"])  # older files
        png = out_dir / f"layers_{backbone}.png"
        plot_layer_scores(per_layer, sel["chosen"], png, f"{backbone}: each layer alone (val picks, test shown)")
        label = dict(zip(per_layer["layer"], per_layer["label"]))
        steps = " → ".join(
            f"{' + '.join(label.get(n, n) for n in step['layers'])} ({step['val_accuracy']:.4f})"
            for step in sel.get("steps", [])
        )
        chosen = ", ".join(label.get(n, n) for n in sel["chosen"])
        scorer = f"{sel.get('scorer', 'a ridge head')}; {sel.get('seconds', 0):.1f}s"
        if sel.get("greedy", True):
            what = (
                f"Greedy forward selection on the validation split (what --layers auto uses) picks "
                f"{chosen} ({scorer}): {steps}."
            )
        else:
            what = (
                f"Each layer alone, scored by {scorer}; the best alone is {chosen}. "
                "--layers auto would search sets of layers greedily on the validation split."
            )
        sections.append(
            (
                f"Which layers: {backbone}",
                f"{what} The final embedding is `last`; tap K is `--layers tapK` (its Keras layer name in the "
                "table, which --layers also takes); --layers all uses every one.",
            )
        )
        sections.append(("", png))
        sections.append(("", per_layer[["label", "layer"] + [c for c in per_layer if c not in ("label", "layer")]]))
    return sections
