"""The stages as a Python API, for notebooks: the same stages, configuration and artifacts as the CLI
(``python -m pipeline <stage>`` is a thin layer over this module), with keyword arguments for options and
the results as pandas DataFrames.

    from pipeline import api
    api.extract("fashion-mnist", config="benchmarks/fashion_mnist_112.toml")
    table = api.heads("fashion-mnist", config="benchmarks/fashion_mnist_112.toml", heads=["ridge", "logreg"])
    api.finetune("fashion-mnist", config="benchmarks/fashion_mnist_112.toml")
    api.report("fashion-mnist")

Options are the CLI's, by their field name (``heads=["ridge"]``, ``lr_grid=[1e-4]``); a name several of a
stage's sections share is given as a section dict (``finetune={"batch_size": 16}``). Results a stage can
reuse are reused, exactly as on the command line (``force=True`` redoes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, resolve_config
from pipeline.errors import PipelineError

STAGES: dict[str, tuple[str, list[str], str]] = {
    # name: (help, config sections, "module:function")
    "data": (
        "prepare the embedded dataset (or check a user's folder) under data/",
        ["data", "prepare"],
        "pipeline.data.prepare:run",
    ),
    "extract": (
        "frozen backbone -> HDF5 embedding cache (artifacts/features/<dataset>/<backbone>@<variant>.h5); "
        "reuses the cache when nothing changed, resumes an interrupted run",
        ["data", "backbone", "extract"],
        "pipeline.extract.stage:run",
    ),
    "heads": (
        "fit tuned, timed heads (ridge, logistic regression, linear and RBF SVM; opt-in MLP, cosine k-NN and the "
        "streaming linear_probe) on the cached embeddings of BACKBONE, per layer set (--layers) and with and "
        "without the dataset's metadata; needs `extract` first",
        ["data", "backbone", "heads"],
        "pipeline.heads:run",
    ),
    "finetune": (
        "fine-tune BACKBONE end to end, timed: phase 1 trains the new head on the frozen backbone; phase 2 "
        "unfreezes every layer (--unfreeze-layers), picks its learning rate from --lr-grid on the validation "
        "split (the search is charged to the fine-tune) and trains until early stopping (--patience; "
        "--epochs-finetune is only a cap, named in the verdict when it stops the run)",
        ["data", "backbone", "finetune"],
        "pipeline.finetune:run",
    ),
    "curve": (
        "learning curve: the heads refitted with the same tuning on nested stratified subsets of the training "
        "split (--fractions), the fine-tune at the smallest and largest; needs `extract`; reuses points already done",
        ["data", "backbone", "heads", "finetune", "curve"],
        "pipeline.curve:run",
    ),
    "forecast": (
        "before paying for the full fine-tune: the heads measured at every size, the fine-tune at a few small "
        "ones (--ladder), then its accuracy, its cost and where it starts to beat the heads, forecast with "
        "intervals widened by the error measured in backtests; needs `extract`; reuses points already done",
        ["data", "backbone", "heads", "finetune", "forecast"],
        "pipeline.forecast.stage:run",
    ),
    "report": (
        "build artifacts/reports/<dataset>/ (report.md, report.html, summary.csv, plots) from whatever results exist",
        ["data", "report"],
        "pipeline.report:run",
    ),
    "predict": (
        "apply the verdict's method (or --method: any head, finetune, frozen_dense) to new images: a CSV of "
        "predicted classes and per-class scores, and the accuracy when the images carry labels",
        ["data", "backbone", "predict"],
        "pipeline.apply.predict:run",
    ),
    "export": (
        "export the verdict's method (or --method) as one self-contained model (raw RGB in, per-class scores "
        "out) in Keras, SavedModel, ONNX or LiteRT format, with labels.txt and a manifest",
        ["data", "backbone", "export"],
        "pipeline.apply.export:run",
    ),
}


TRAINING = ("heads", "finetune", "curve", "forecast")  # stages that reuse up-to-date results unless --force


def run_stage(name: str, cfg: Config):
    """Run the stage ``name`` with a resolved configuration; returns what the stage returns."""
    module, func = STAGES[name][2].split(":")
    return getattr(importlib.import_module(module), func)(cfg)


def configure(stage: str, dataset: str | None = None, *, artifacts: str | None = None, config: str | None = None,
              force: bool = False, **options: Any) -> Config:  # fmt: skip
    """The configuration a stage runs with: defaults, then the TOML file, then ``options``."""
    if stage not in STAGES:
        raise PipelineError(f"no stage {stage!r} (stages: {', '.join(STAGES)})")
    cfg = resolve_config(argparse.Namespace(config=config, artifacts=artifacts, force=force))
    sections = STAGES[stage][1]
    if dataset is not None:
        cfg.data.dataset = str(dataset)
    given = list(cfg.explicit)
    for key, value in options.items():
        if key in sections and isinstance(value, dict):
            for name, v in value.items():
                _set(cfg, key, name, v)
                given.append(f"{key}.{name}")
            continue
        owners = [s for s in sections if key in {f.name for f in dataclasses.fields(getattr(cfg, s))}]
        if len(owners) != 1:
            why = "is in several sections: give it as section={...}" if owners else "is not an option of"
            raise PipelineError(f"{key!r} {why} `{stage}` (sections: {', '.join(sections)})")
        _set(cfg, owners[0], key, value)
        given.append(f"{owners[0]}.{key}")
    cfg.explicit = tuple(dict.fromkeys(given))
    return cfg


def _set(cfg: Config, section: str, name: str, value: Any) -> None:
    part = getattr(cfg, section)
    if name not in {f.name for f in dataclasses.fields(part)}:
        raise PipelineError(f"{section} has no option {name!r}")
    setattr(part, name, tuple(value) if isinstance(value, list) else value)


def results(dataset: str, artifacts: str = "artifacts") -> pd.DataFrame:
    """Every measured result of ``dataset`` (one row per method, features, layers, training size, seed)."""
    from pipeline import results as table

    cfg = configure("report", dataset, artifacts=artifacts)
    return table.read_results(table.results_path(cfg.artifacts, cfg.dataset_name))


def _rows_of(cfg: Config, method_kind: str) -> pd.DataFrame:
    from pipeline.results import FINETUNED

    rows = results(cfg.data.dataset, cfg.artifacts)
    tuned = rows["method"].isin(FINETUNED)
    return rows[tuned if method_kind == "finetune" else ~tuned].reset_index(drop=True)


def prepare(dataset: str | None = None, **kw) -> None:
    """`make data`: prepare an embedded dataset or check a folder of your own."""
    run_stage("data", configure("data", dataset, **kw))


def extract(dataset: str | None = None, **kw) -> Path:
    """`make extract`: the frozen backbone's embeddings into the HDF5 cache; returns the cache's path."""
    from pipeline.extract.stage import cache_path

    cfg = configure("extract", dataset, **kw)
    run_stage("extract", cfg)
    return cache_path(cfg)


def heads(dataset: str | None = None, **kw) -> pd.DataFrame:
    """`make svm`: tuned, timed heads on the cache; returns the heads' rows of the results table."""
    cfg = configure("heads", dataset, **kw)
    run_stage("heads", cfg)
    return _rows_of(cfg, "heads")


def finetune(dataset: str | None = None, **kw) -> pd.DataFrame:
    """`make finetune`: the fine-tuned baseline; returns the fine-tunes' rows of the results table."""
    cfg = configure("finetune", dataset, **kw)
    run_stage("finetune", cfg)
    return _rows_of(cfg, "finetune")


def curve(dataset: str | None = None, **kw) -> pd.DataFrame:
    """`make curve`: heads (and fine-tunes) on nested subsets; returns every row of the results table."""
    cfg = configure("curve", dataset, **kw)
    run_stage("curve", cfg)
    return results(cfg.data.dataset, cfg.artifacts)


def forecast(dataset: str | None = None, **kw) -> pd.DataFrame:
    """`make forecast`: the full fine-tune forecast from a few small ones; one row per forecast size."""
    cfg = configure("forecast", dataset, **kw)
    return pd.DataFrame([dataclasses.asdict(r) for r in run_stage("forecast", cfg)])


def report(dataset: str | None = None, **kw) -> Path:
    """`make report`: the report from whatever results exist; returns the path of report.html."""
    return run_stage("report", configure("report", dataset, **kw))


def predict(dataset: str | None = None, **kw):
    """`make predict`: the verdict's method (or ``method=``) applied to new images (``images=``)."""
    return run_stage("predict", configure("predict", dataset, **kw))


def export(dataset: str | None = None, **kw):
    """`make export`: the verdict's method (or ``method=``) as one self-contained model."""
    return run_stage("export", configure("export", dataset, **kw))
