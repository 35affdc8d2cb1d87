"""What makes a cache's numbers, and where the cache lives.

The key holds everything that changes the embeddings (backbone, weights hash, input size,
preprocessing, the exact file list, taps, views, the precision computed in); a cache whose key differs
is stale and is never reused. The runtime that computed it is recorded but not keyed: every runtime's
embeddings equal TensorFlow's within 1e-4 (tests/test_runtimes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CACHE_FORMAT = 1
KEY_FIELDS = (
    "format",
    "backbone",
    "weights",
    "weights_sha256",
    "input_size",
    "preprocessing",
    "dataset_fingerprint",
    "class_names",
    "taps",
    "views",
    "precision",
)
SHOWN = ("backbone", "weights", "input_size", "preprocessing", "precision")  # old -> new in the stale message
VIEWS = "views"  # augmented training views, a group beside the split groups
NO_TAPS = "none"


def cache_path(artifacts: str | Path, dataset: str, backbone: str) -> Path:
    return Path(artifacts) / "features" / dataset / f"{backbone}.h5"


def make_key(
    *,
    backbone: str,
    weights: str,
    weights_sha256: str | None,
    input_size: int,
    preprocessing: str,
    dataset_fingerprint: str,
    class_names: list[str],
    precision: str,
    taps: tuple[str, ...] = (),
    tap_grid: int = 1,
    views: dict | None = None,
) -> dict:
    """The key. Taps are keyed as requested (resolving names needs the model, which a cache hit must not
    build); without taps or views the key is what older caches have."""
    extra = {}
    if taps and list(taps) != [NO_TAPS]:
        extra["taps"] = json.dumps({"taps": list(taps), "grid": tap_grid})
    if views:
        extra["views"] = json.dumps(views)
    return {
        "format": CACHE_FORMAT,
        "backbone": backbone,
        "weights": weights,
        "weights_sha256": weights_sha256 or "",
        "input_size": input_size,
        "preprocessing": preprocessing,
        "dataset_fingerprint": dataset_fingerprint,
        "class_names": json.dumps(class_names),
        "precision": precision,
        **extra,
    }


def read_key(attrs) -> dict:
    """The key a cache was made with (from its attributes). Caches from before ``precision`` was keyed
    recorded only their device, and on a CPU that settles it: float32."""
    key = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items() if k in KEY_FIELDS}
    if "precision" not in key and attrs.get("device") == "CPU":
        key["precision"] = "float32 (CPU)"
    return key


def inputs_part(attrs: dict) -> dict:
    """The cache's part of a head's inputs key. A cache from before precision was keyed leaves it out, so
    its heads keep their inputs keys."""
    return {k: attrs.get(k) for k in KEY_FIELDS if k != "precision" or k in attrs}


def recorded(attrs: dict) -> dict:
    """Every key field as the cache's attributes hold it (a head's record names the cache it read)."""
    return {k: attrs.get(k) for k in KEY_FIELDS}


def differences(old: dict, new: dict) -> list[str]:
    return [
        f"{k} changed: {old.get(k) or '(not recorded)'} -> {new.get(k)}" if k in SHOWN else f"{k} changed"
        for k in KEY_FIELDS
        if old.get(k) != new.get(k)
    ]
