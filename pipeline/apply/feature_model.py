"""Rebuild the exact feature model a cache was extracted with, from the cache's key and run record.

A head fitted on a cache expects the blocks of that cache's forward pass: the same backbone, weights,
input size, preprocessing, tapped layers in the same order and the same pooling. ``predict`` and
``export`` apply heads to new images, so they rebuild that model here, and refuse one whose weights
no longer hash to what the cache recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import backbones
from pipeline.backbones import taps as taps_mod
from pipeline.config import BackboneConfig
from pipeline.errors import PipelineError
from pipeline.extract.cache.reader import check_cache


def rebuild(cache: Path, artifacts: Path, portable: bool = False):
    """(feature model, cache attributes): raw RGB 0-255 in, [embedding, tap 1, ...] out, as in ``extract``;
    ``portable``: from built-in Keras layers only (for export)."""
    cache = Path(cache)
    attrs = check_cache(cache)
    try:
        config = json.loads(cache.with_suffix(".json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise PipelineError(
            f"{cache.with_suffix('.json')} (the cache's run record) is missing: rerun `make extract`"
        ) from None
    bcfg = BackboneConfig(**config["backbone"])
    spec = backbones.from_config(bcfg)
    size = int(attrs["input_size"])
    weights = backbones.resolve_weights(spec, bcfg.weights, artifacts, size)
    if (weights.sha256 or "") != attrs.get("weights_sha256", ""):
        raise PipelineError(
            f"the weights of {spec.name} changed since {cache.name} was extracted: rerun `make extract`, then the heads"
        )
    base = backbones.build_backbone(spec, weights, size, config["data"]["seed"])
    tap_layers = json.loads(attrs.get("tap_layers", "[]"))
    grid = json.loads(attrs["taps"])["grid"] if attrs.get("taps") else 1
    taps = taps_mod.resolve(base, tap_layers, grid, spec.name) if tap_layers else []
    if [t.layer for t in taps] != tap_layers:
        raise PipelineError(f"{cache.name} taps {tap_layers}, which {spec.name} no longer has: rerun `make extract`")
    return taps_mod.feature_model(spec, base, taps, portable), attrs
