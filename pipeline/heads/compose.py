"""How a head's estimator is composed: per-block standardisation, block weights (several layers, metadata)
and the classifier the registry builds, as one scikit-learn ``Pipeline`` with the grid tuned on val."""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads import registry

FEATURE_SETS = ("image", "image+meta", "image+meta_norm")
FLOATS = (np.float64, np.float32)  # BlockWeight keeps either dtype as it comes


class BlockWeight(TransformerMixin, BaseEstimator):
    """Scale a standardised block so its total variance is ``weight`` x that of another block.

    A handful of metadata columns next to 1,280 embedding dimensions would be
    drowned out; scaling by sqrt(n_other / n_block) gives them equal say at
    weight 1, and the weight is tuned like C.
    """

    def __init__(self, weight: float = 1.0, n_other: int = 1):
        self.weight = weight
        self.n_other = n_other

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=FLOATS, reset=True)
        self.factor_ = self.weight * np.sqrt(self.n_other / max(X.shape[1], 1))
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOATS, reset=False)
        return X * np.asarray(self.factor_, dtype=X.dtype)


def make_classifier(head: str, h, seed: int, n: int = 0, d: int = 0):
    """The classifier, its solver chosen by the training matrix's size (n images x d features);
    ``h``: the heads settings."""
    return registry.get(head).factory(h, seed, n, d)


def grid(head: str, h) -> dict:
    spec = registry.get(head)
    return {f"clf__{spec.grid_param}": list(getattr(h, spec.grid_setting))}


def make_pipeline(
    head: str,
    features: str,
    dims: int | list[int],
    n_meta: int,
    h,
    seed: int,
    ref: int | None = None,
    n: int = 0,
) -> tuple[Pipeline, dict]:
    """The estimator and its grid. Image features are standardised inside the pipeline; with
    several blocks (layers) each is also scaled to ``ref`` dimensions' worth of variance."""
    widths = [dims] if isinstance(dims, int) else list(dims)
    clf = make_classifier(head, h, seed, n, sum(widths) + n_meta)
    tuned = grid(head, h)
    if features == "image" and len(widths) == 1:
        return Pipeline([("scale", StandardScaler()), ("clf", clf)]), tuned
    ref = ref or widths[0]
    blocks, start = [], 0
    for k, w in enumerate(widths):
        if len(widths) == 1:
            blocks.append(("image", StandardScaler(), slice(0, w)))
        else:
            blocks.append(
                (
                    f"layer{k}",
                    Pipeline([("scale", StandardScaler()), ("weight", BlockWeight(1.0, ref))]),
                    slice(start, start + w),
                )
            )
        start += w
    dim = start
    image_variance = dim if len(widths) == 1 else ref * len(widths)
    if features == "image+meta":
        blocks.append(("meta", "passthrough", slice(dim, dim + n_meta)))
    elif features == "image+meta_norm":
        blocks.append(
            (
                "meta",
                Pipeline([("scale", StandardScaler()), ("weight", BlockWeight(1.0, image_variance))]),
                slice(dim, dim + n_meta),
            )
        )
        tuned["blocks__meta__weight__weight"] = list(h.meta_weights)
    return Pipeline([("blocks", ColumnTransformer(blocks)), ("clf", clf)]), tuned
