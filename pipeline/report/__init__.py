"""`make report`: the verdict, accuracy vs training time with uncertainty, deltas vs fine-tuning,
the learning curve, several backbones, confusion matrices, per-subgroup accuracy and Grad-CAM, as
report.md + self-contained report.html + summary.csv.

Reads only what earlier stages wrote: the results table, per-image test
predictions, run records, the fine-tuned model and the dataset's metadata.
Methods that have not run are shown as such, not as errors. The parts:
``tables`` and ``stats`` (numbers), ``verdict`` and ``curve`` (conclusions),
``plots`` (figures), ``render`` (markdown + HTML), ``layers`` (layer-set section).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from pipeline.artifacts import atomic_path, library_versions, writable_dir, write_json_atomic
from pipeline.config import Config
from pipeline.errors import PipelineError, first_line
from pipeline.report import forecast
from pipeline.report.curve import curve_points, heads_only_note, where_finetuning_pays
from pipeline.report.layers import layer_sections
from pipeline.report.plots import gradcam, plot_accuracy_vs_time, plot_confusion, plot_curve, plot_gradcam
from pipeline.report.render import Verdict, render
from pipeline.report.stats import with_uncertainty
from pipeline.report.tables import (
    beside_their_finetune,
    best_head,
    best_per_backbone,
    comparison_table,
    details_table,
    display_table,
    method_label,
    pareto_front,
    per_class_table,
    ratio_text,
    seed_spread,
    seed_table,
    subgroup_accuracy,
    vs_finetune,
)
from pipeline.report.verdict import choice, verdict
from pipeline.results import extra_seed, head_name, read_results, results_path

log = logging.getLogger(__name__)


class Evaluated(NamedTuple):
    """A model whose per-image test predictions the report analyses."""

    name: str
    pred: pd.DataFrame
    path: Path
    finetuned: str | None = None  # the backbone, for a fine-tuned model


def predictions_file(art: Path, dataset: str, row: pd.Series) -> Path:
    """Where a results row's per-image test predictions are (rows written before the column existed
    have them at the default place)."""
    given = row.get("predictions")
    if isinstance(given, str) and given:
        return art / given
    if row["method"] in ("finetune", "frozen_dense"):
        suffix = "finetuned" if row["method"] == "finetune" else "frozen_dense"
        return art / "models" / dataset / f"{row['backbone']}-{suffix}.predictions.csv"
    return (
        art
        / "heads"
        / dataset
        / row["backbone"]
        / f"{head_name(row['method'], row['features'], row['layers'])}.predictions.csv"
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_pred(path: Path) -> pd.DataFrame | None:
    try:
        pred = pd.read_csv(path, dtype={"id": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    return pred if {"id", "y_true", "y_pred"} <= set(pred.columns) else None


def run(cfg: Config) -> Path:
    """Build artifacts/reports/<dataset>/ from whatever results exist."""
    dataset = cfg.dataset_name
    art = Path(cfg.artifacts)
    out_dir = writable_dir(art / "reports" / dataset)
    res = read_results(results_path(art, dataset))
    if res.empty:
        raise PipelineError(
            f"no results for {dataset} yet in {results_path(art, dataset)}: run `make svm` and/or `make finetune`"
        )
    meta = None
    if cfg.metadata_path is not None:
        from pipeline.data import from_config, load_metadata

        ds = from_config(cfg)
        meta = load_metadata(cfg.metadata_path, ds.all_ids(), cfg.data.id_column, ds.name)

    measured = res  # as the stages wrote it: the forecast's plot reads its seeds and its subsets from it
    res = beside_their_finetune(res)
    spread = seed_spread(res)
    res = res[~extra_seed(res)]  # the extra seeds are a spread of the fine-tune, not methods of their own
    table, preds = _scored_table(res, art, dataset, meta is not None)
    with atomic_path(out_dir / "summary.csv") as tmp:
        table.to_csv(tmp, index=False)
    chosen = choice(table)
    if chosen is not None:  # what `predict` and `export` apply by default: the verdict's own pick
        write_json_atomic(out_dir / "choice.json", chosen)
    else:
        (out_dir / "choice.json").unlink(missing_ok=True)
    main = display_table(table)
    main.attrs["css"] = "main"
    sections = _comparison_sections(table, main, res, art, dataset, out_dir, spread, measured)
    models = _evaluated(table, preds, art, dataset)
    records = {m.name: _read_json(m.path.with_name(m.path.name.replace(".predictions.csv", ".json"))) for m in models}
    class_names = next((r["class_names"] for r in records.values() if r and "class_names" in r), None)
    class_names = class_names or _class_names_seen(models)
    if models and class_names:
        sections[0][1].extend(_untested_note(models[0], class_names))
    sections += _model_sections(cfg, models, class_names, meta, art, out_dir)
    sections.append(_records_section(records))
    render(sections, f"Transfer learning on {dataset}: frozen features + heads vs fine-tuning", out_dir)
    _print_summary(sections[0][1], main, out_dir)
    return out_dir / "report.html"


def _scored_table(res: pd.DataFrame, art: Path, dataset: str, with_meta: bool):
    """The comparison table with intervals and deltas vs the fine-tune, and each row's predictions."""
    table = comparison_table(res, with_meta=with_meta)
    preds = {}
    for i, row in table[table["status"] == "ok"].iterrows():
        pred = _read_pred(predictions_file(art, dataset, row))
        if pred is not None:
            preds[i] = pred
    baselines = {r["backbone"]: i for i, r in table.iterrows() if r["method"] == "finetune" and r["status"] == "ok"}
    table = with_uncertainty(table, preds, baselines)
    table["vs_finetune"] = vs_finetune(table)
    return table, preds


def _comparison_sections(table, main, res, art: Path, dataset: str, out_dir: Path, spread, measured) -> list:
    """Verdict, comparison table, accuracy-vs-time plot, seeds, best per backbone, learning curve, layers,
    details."""
    sections: list[tuple[str, object]] = [("", Verdict(verdict(table, spread)))]
    sections.append(
        (
            "Comparison",
            "Test accuracy and cost of every method, with 95% bootstrap intervals over the test images. Heads are "
            "charged tuning + final fit + feature extraction; the fine-tune (and frozen_dense, its phase 1) its "
            "training time. Δ is against the fine-tuned model of the same backbone, its interval from a paired "
            "bootstrap on the same test images.",
        )
    )
    sections.append(("", main))
    plot = out_dir / "accuracy_vs_time.png"
    plot_accuracy_vs_time(table, plot, dataset)
    sections.append(("Accuracy vs training time", plot))
    if len(spread):
        sections.append(
            (
                "Fine-tune across training seeds",
                "The same fine-tune trained again with other training seeds (initialisation, augmentation, "
                "shuffling; same images): its run-to-run spread, beside the test-set intervals above, which "
                "describe one run's uncertainty from the finite test set.",
            )
        )
        sections.append(("", seed_table(spread)))
    if table["backbone"].nunique() > 1:
        sections.append(("Best per backbone", best_per_backbone(table)))
    curve = curve_points(res)
    if len(curve):
        png = out_dir / "learning_curve.png"
        plot_curve(curve, png, dataset)
        text = where_finetuning_pays(curve, lambda r: _read_pred(predictions_file(art, dataset, r)))
        note = heads_only_note(curve)
        sections.append(
            ("Learning curve", " ".join(text + ([note] if note else [])) or "Test accuracy vs training images.")
        )
        sections.append(("", png))
    sections += _forecast_sections(sections[0][1], table, measured, art, dataset, out_dir)
    sections += layer_sections(art / "heads" / dataset, out_dir)
    details = details_table(table)
    details.attrs["css"] = "details"
    sections.append(("Details of every run", details))
    return sections


def _forecast_sections(verdict_lines: list[str], table, measured, art: Path, dataset: str, out_dir: Path) -> list:
    """The forecast's section; its answer joins the verdict where no full-size fine-tune was run."""
    records, band = forecast.read(art, dataset)
    if not records:
        return []
    ok = table[(table["method"] == "finetune") & (table["status"] == "ok")]
    fine_tuned_in_full = set(ok["backbone"].astype(str).str.split("@").str[0])
    verdict_lines.extend(forecast.verdict_lines(records, fine_tuned_in_full))
    return forecast.sections(records, band, measured, out_dir, dataset)


def _evaluated(table: pd.DataFrame, preds: dict, art: Path, dataset: str) -> list[Evaluated]:
    """The models analysed image by image: the best head by validation accuracy and each fine-tune."""
    models: list[Evaluated] = []
    head = best_head(table)
    if head is not None and head.name in preds:
        label = method_label(head["method"], head["features"], head["layers"])
        p = predictions_file(art, dataset, head)
        models.append(Evaluated(f"best head by validation accuracy: {head['backbone']} {label}", preds[head.name], p))
    ok = table[table["status"] == "ok"]
    for i, r in ok[ok["method"] == "finetune"].iterrows():
        if i in preds:
            models.append(
                Evaluated(f"fine-tuned {r['backbone']}", preds[i], predictions_file(art, dataset, r), r["backbone"])
            )
    return models


def _untested_note(model: Evaluated, class_names: list[str]) -> list[str]:
    tested = set(model.pred["y_true"])
    untested = [n for i, n in enumerate(class_names) if i not in tested]
    if not untested:
        return []
    return [
        f"The test split holds no images of {', '.join(untested)}: the test accuracy cannot speak for "
        f"{'it' if len(untested) == 1 else 'them'}."
    ]


def _model_sections(cfg: Config, models, class_names, meta, art: Path, out_dir: Path) -> list[tuple[str, object]]:
    """Confusion matrices and per-class scores of each model, its subgroups, Grad-CAM of the fine-tune."""
    sections: list[tuple[str, object]] = []
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
                    f"Accuracy per metadata subgroup: {m.name} (overall {overall:.4f}; 95% Wilson intervals)",
                    sub if len(sub) else "no metadata columns that form subgroups",
                )
            )
    finetuned = [m for m in models if m.finetuned]
    if finetuned and cfg.report.gradcam_images > 0:
        m = finetuned[0]
        png = out_dir / "gradcam.png"
        model_file = art / "models" / cfg.dataset_name / f"{m.finetuned}-finetuned.keras"
        try:
            if model_file.exists() and plot_gradcam(
                model_file, m.pred, cfg.dataset_dir, class_names, cfg.report.gradcam_images, png
            ):
                sections.append(("Grad-CAM (fine-tuned model)", png))
        except (OSError, ValueError) as e:
            log.warning("warning: Grad-CAM skipped: %s", first_line(e))
    return sections


def _records_section(records: dict) -> tuple[str, str]:
    shown = {
        name: {"config": r.get("config"), "versions": r.get("versions"), "timestamp": r.get("timestamp")}
        for name, r in records.items()
        if r
    }
    shown["report"] = {"versions": library_versions()}
    return ("Configuration and library versions", "```\n" + json.dumps(shown, indent=2, default=str) + "\n```")


def _class_names_seen(models: list[Evaluated]) -> list[str]:
    """Fallback for run records without class names: the classes the predictions mention."""
    names: dict[int, str] = {}
    for m in models:
        names.update(dict(zip(m.pred["y_true"], m.pred["true"])))
        names.update(dict(zip(m.pred["y_pred"], m.pred["pred"])))
    return [names[i] for i in sorted(names)] if names else []


def _print_summary(lines: list[str], main: pd.DataFrame, out_dir: Path) -> None:
    print()
    print(main.to_string(index=False))
    print()
    for line in lines:
        print(line)
    print(f"\nreport: {out_dir / 'report.html'} (and report.md, summary.csv, accuracy_vs_time.png)")


__all__ = [
    "run",
    "comparison_table",
    "pareto_front",
    "ratio_text",
    "subgroup_accuracy",
    "per_class_table",
    "gradcam",
    "predictions_file",
]
