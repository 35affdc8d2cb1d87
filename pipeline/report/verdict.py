"""The report's first lines: the answer in words, computed from the comparison table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.finetune.record import TIE_TO_LARGER, FinetuneParams, SearchRecord
from pipeline.report.stats import unpaired
from pipeline.report.tables import best_head, ci_text, method_label, pareto_front, ratio_text

ALPHA = 0.05


def _params(ft: pd.Series) -> FinetuneParams:
    try:
        raw = json.loads(ft["params"])
    except (TypeError, ValueError):
        raw = {}
    return FinetuneParams.from_params(raw if isinstance(raw, dict) else {})


def _baseline(ft: pd.Series) -> str:
    """What the fine-tune was, so a weak baseline is not over-read: what trained, the learning rate and how
    it was chosen, how many epochs and what ended them, and what the search cost."""
    p = _params(ft)
    ran, best, planned = p.epochs_run, p.best_epochs, p.epochs
    name = str(ft["backbone"]).split("@")[0]  # a variant's rows carry the backbone's own fine-tune
    parts = [f"{name} fine-tuned on {ft['n_train']:,.0f} images" if np.isfinite(ft["n_train"]) else ""]
    if ran:
        layers = p.unfreeze_layers
        which = "every backbone layer" if layers == -1 else f"top {layers} backbone layers"
        text = f"{' + '.join(str(e) for e in ran)} epochs (head, then {which} trained)"
        if planned:
            text += f" of at most {' + '.join(str(e) for e in planned)}"
        if best:
            text += f"; kept epoch {' and '.join(str(b) for b in best)}"
        if p.stop:
            text += "; phase 2 " + ("hit its epoch cap" if p.capped else "ended by early stopping")
        parts.append(text)
    lr = p.learning_rate_finetune
    if lr is not None:
        parts.append(f"phase-2 learning rate {lr:g}{_search_text(p.search)}")
    seconds = f"{ft['total_seconds']:,.0f} s"
    if p.search_seconds:
        rest = ft["total_seconds"] - p.search_seconds
        seconds += f" (learning-rate search {p.search_seconds:,.0f} s + training {rest:,.0f} s)"
    parts.append(seconds)
    return "Baseline: " + ", ".join(x for x in parts if x) + "."


def _search_text(record: SearchRecord | None) -> str:
    """How the rate was chosen: from which rates, over how many rungs, and whether the choice held up."""
    if record is None or not record.rungs or len(record.rungs[0]) < 2:
        return ""
    text = f" chosen on val from {', '.join(record.rungs[0])}"
    ending = (
        ", a tie to the larger rate"
        if record.decided == TIE_TO_LARGER
        else ", its lead still within the validation noise"
        if record.within_noise
        else ""
    )
    later = "; ".join(f"rung {k} between {', '.join(r)}" for k, r in enumerate(record.rungs[1:], 2))
    text += f" (then {later}{ending})" if later else ending
    if record.beaten_by:
        rates = ", ".join(f"{k} (val {v:.3f})" for k, v in record.beaten_by.items())
        text += (
            f" — flagged: its final val {record.final_val:.3f} is below what {rates} reached in the search, "
            "so the search may have chosen wrong"
        )
    return text


def device_time(head: pd.Series, ft: pd.Series) -> str:
    """When the fine-tune ran on several devices, its cost in device-seconds too: its wall seconds bought
    more hardware than the heads' one process had, so the wall-clock ratio alone flatters it."""
    p = _params(ft)
    n = p.replicas
    if n <= 1 or not head["total_seconds"] > 0:
        return ""
    spent = ft["total_seconds"] * n
    how = (p.devices or {}).get("strategy", f"{n} devices")
    return (
        f" In device time (the fine-tune on {n} devices: {how}; the head on one): {spent:,.0f} device-s vs "
        f"{head['total_seconds']:,.0f}, {spent / head['total_seconds']:,.1f}× the head's."
    )


def capped(ft: pd.Series) -> bool:
    """The fine-tune's phase 2 ran to its epoch cap: by the stopping rule it was still improving."""
    return _params(ft).capped


CAPPED = " The fine-tune was still improving when its epoch cap stopped it: this difference may overstate the heads."


def verdict(table: pd.DataFrame, spread: pd.DataFrame | None = None) -> list[str]:
    """Two or three sentences per backbone: the best frozen head against the fine-tune, with its
    uncertainty and significance, what the Pareto front holds, and what the baseline was; with several
    training seeds of the fine-tune (``spread``), their mean ± sd and whether it outweighs the difference."""
    ok = table[table["status"] == "ok"]
    if ok.empty:
        return ["No results yet."]
    lines = []
    for b in sorted(ok["backbone"].unique()):
        head = best_head(table, b)
        ft = ok[(ok["backbone"] == b) & (ok["method"] == "finetune")]
        who = f"{b}: " if ok["backbone"].nunique() > 1 else ""
        if head is None:
            lines.append(f"{who}no frozen-feature head has run yet: `make svm`.")
            continue
        label = method_label(head["method"], head["features"], head["layers"])
        if ft.empty:
            lines.append(
                f"{who}Best frozen head (by validation accuracy): {label}, test accuracy {head['test_accuracy']:.4f}"
                f"{_acc_ci(head)}. No fine-tuned baseline yet: run `make finetune` to know what fine-tuning would add."
            )
            continue
        f = ft.iloc[0]
        text = f"{who}Best frozen head (by validation accuracy): {label} — {_versus(head, f)}"
        lo, hi, p = head.get("delta_ci_low", np.nan), head.get("delta_ci_high", np.nan), head.get("mcnemar_p", np.nan)
        stats = []
        if np.isfinite(lo):
            stats.append(f"95% CI {ci_text(lo, hi, signed=True)}")
        if np.isfinite(p):
            if p < ALPHA:
                side = "the head is" if head["delta_pt"] > 0 else "the fine-tune is"
                stats.append(f"McNemar p = {p:.2g}: {side} significantly better")
            else:
                stats.append(f"McNemar p = {p:.2g}: no significant difference")
        if stats:
            text += f" ({'; '.join(stats)})"
        ratio = head["time_ratio"]
        cost = ratio_text(ratio).replace("faster", "cheaper").replace("slower", "dearer")
        text += f", {cost} ({head['total_seconds']:,.0f} s vs {f['total_seconds']:,.0f} s)." if cost else "."
        lines.append(text + device_time(head, f) + (CAPPED if capped(f) else ""))
        if head["features"] != "image":
            lines.extend(_image_only(table, b, head))
        lines.append(_baseline(f))
        same = spread[(spread["backbone"] == b) & (spread["n_train"] == f["n_train"])] if spread is not None else []
        if len(same):  # the seeds of the compared fine-tune only, not of a smaller curve or forecast point
            lines.append(_seeds(same.iloc[0], head))
        dense = ok[(ok["backbone"] == b) & (ok["method"] == "frozen_dense")]
        if len(dense):
            d = dense.iloc[0]
            lines.append(
                f"The Keras-guide recipe without a cache (backbone frozen, dense head trained with augmentation, "
                f"the backbone run on every image every epoch; phase 1 of the fine-tune) reached "
                f"{d['test_accuracy']:.4f} in {d['total_seconds']:,.0f} s ({d['delta_pt']:+.2f} pt)."
            )
    front = pareto_front(table)
    names = [
        (f"{r['backbone']} " if ok["backbone"].nunique() > 1 else "")
        + method_label(r["method"], r["features"], r["layers"])
        for _, r in front.iterrows()
    ]
    lines.append(f"On the Pareto front (nothing else is both more accurate and cheaper): {', '.join(names)}.")
    return lines


def _seeds(s: pd.Series, head: pd.Series) -> str:
    """The fine-tune's run-to-run spread beside the head's difference from it, in words."""
    sd, delta = s["sd"] * 100, abs(head["delta_pt"])
    text = (
        f"Across {s['seeds']} training seeds the fine-tune scored {s['mean']:.4f} ± {s['sd']:.4f} (mean ± sd; "
        f"{s['min']:.4f} – {s['max']:.4f}): "
    )
    if sd >= delta:
        return text + (
            f"its seed-to-seed spread ({sd:.2f} pt) is at least the {delta:.2f} pt difference above, so another "
            "training run of the fine-tune could reverse it."
        )
    return text + f"its seed-to-seed spread ({sd:.2f} pt) is smaller than the {delta:.2f} pt difference above."


def _image_only(table: pd.DataFrame, backbone: str, head: pd.Series) -> list[str]:
    """When the best head uses metadata, what the images alone give: the metadata's own worth, and the
    answer for a user who will not have the metadata at prediction time."""
    alone = best_head(table[table["features"] == "image"], backbone)
    if alone is None:
        return []
    lo, hi = alone.get("delta_ci_low", np.nan), alone.get("delta_ci_high", np.nan)
    ci = ci_text(lo, hi, signed=True)
    gain = (head["test_accuracy"] - alone["test_accuracy"]) * 100
    return [
        f"Images alone, the best head is {method_label(alone['method'], alone['features'], alone['layers'])}: "
        f"{alone['test_accuracy']:.4f}, {alone['delta_pt']:+.2f} pt vs the fine-tune"
        + (f" (95% CI {ci})" if ci else "")
        + f"; the metadata adds {gain:+.2f} pt."
    ]


def choice(table: pd.DataFrame) -> dict | None:
    """The method the verdict recommends, over every backbone: the best frozen head by validation accuracy
    (``best_head``, as in the verdict's first line), recorded so that `predict` and `export` apply exactly it."""
    head = best_head(table)
    if head is None:
        return None
    name = Path(str(head["predictions"])).name.removesuffix(".predictions.csv")

    def num(key):
        value = head.get(key, np.nan)
        return None if pd.isna(value) else float(value)

    return {
        "backbone": head["backbone"],
        "name": name,
        "method": head["method"],
        "features": head["features"],
        "layers": head["layers"],
        "label": method_label(head["method"], head["features"], head["layers"]),
        "n_train": num("n_train"),
        "val_accuracy": num("val_accuracy"),
        "test_accuracy": num("test_accuracy"),
        "test_accuracy_ci": [num("acc_ci_low"), num("acc_ci_high")],
        "delta_vs_finetune_pt": num("delta_pt"),
        "delta_ci_pt": [num("delta_ci_low"), num("delta_ci_high")],
        "mcnemar_p": num("mcnemar_p"),
        "total_seconds": num("total_seconds"),
    }


def _versus(head: pd.Series, ft: pd.Series) -> str:
    """The two accuracies and Δ; when the head scored other test images than the fine-tune (metadata rows
    dropped), each accuracy with its count and Δ on the images both scored, which is what Δ is."""
    if not unpaired(head):
        return f"{head['test_accuracy']:.4f} vs {ft['test_accuracy']:.4f} fine-tuned, {head['delta_pt']:+.2f} pt"
    return (
        f"{head['test_accuracy']:.4f} on its {head['n_scored']:,.0f} test images vs {ft['test_accuracy']:.4f} "
        f"fine-tuned on {ft['n_scored']:,.0f}; on the {head['n_paired']:,.0f} images both scored "
        f"{head['delta_pt']:+.2f} pt"
    )


def _acc_ci(row: pd.Series) -> str:
    text = ci_text(row.get("acc_ci_low", np.nan), row.get("acc_ci_high", np.nan))
    return f" (95% CI {text})" if text else ""
