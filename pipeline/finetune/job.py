"""One fine-tune as the orchestrator (``train``) hands it down to the phases: its data, backbone, weights,
training seed and where its artifacts go."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from pipeline import backbones, results
from pipeline.config import Config
from pipeline.data import Dataset


def model_path(cfg: Config, n_subset: int | None = None, extra_seed: int | None = None) -> Path:
    """``extra_seed``: a training seed beyond the configured one (``--seeds``), named ``-seed<N>``."""
    seed = f"-seed{extra_seed}" if extra_seed is not None else ""
    name = f"{backbones.name_for(cfg.backbone.backbone)}-finetuned{results.subset_suffix(n_subset)}{seed}.keras"
    return Path(cfg.artifacts) / "models" / cfg.dataset_name / name


@dataclass
class Job:
    """One fine-tune: its data, backbone, weights and where its artifacts go."""

    cfg: Config
    ds: Dataset
    spec: backbones.BackboneSpec
    size: int
    weights: backbones.Weights
    out: Path  # the fine-tuned model; its stem names the predictions and the record
    n_subset: int | None = None  # a learning-curve point's training images (None: the whole split)
    extra_seed: int | None = None  # a training seed beyond the configured one (``--seeds``)

    def with_seed(self, seed: int) -> Job:
        """The same fine-tune (data, weights) under another training seed, with its own artifacts."""
        return dataclasses.replace(self, out=model_path(self.cfg, self.n_subset, seed), extra_seed=seed)

    @property
    def seed(self) -> int:
        """The training seed: initialisation, augmentation draws, shuffling."""
        return self.cfg.data.seed if self.extra_seed is None else self.extra_seed

    @property
    def stem(self) -> Path:
        return self.out.with_suffix("")

    @property
    def frozen_stem(self) -> Path:
        return self.stem.with_name(self.stem.name.replace("-finetuned", "-frozen_dense"))

    @property
    def work(self) -> Path:
        """The folder its progress lives in until it is saved (checkpoints, decoded images, the state)."""
        return self.out.with_name(self.out.stem + ".work")
