"""`make svm`: the classical heads on cached embeddings (+ metadata), as one registry of head kinds.

- ``registry``: every head (estimator factory, grid, inputs-key settings, streaming?, foldable?, memory).
- ``compose``: the scikit-learn ``Pipeline`` of a head (per-block scaling, metadata weight, classifier).
- ``fit``: tune on val (or CV), refit, score; timed.
- ``budget``: refuse, in one line, heads whose matrices would not fit in memory.
- ``persist``: model + predictions staged together, the record that vouches for them, the results row.
- ``stage``: the stage: plan (layer sets x feature sets x heads), reuse what is up to date, fit the rest.
"""

from pipeline.heads.compose import FEATURE_SETS, BlockWeight, make_classifier, make_pipeline
from pipeline.heads.fit import HeadResult, fit_head
from pipeline.heads.stage import on_subsets, run

__all__ = [
    "FEATURE_SETS",
    "BlockWeight",
    "HeadResult",
    "fit_head",
    "make_classifier",
    "make_pipeline",
    "on_subsets",
    "run",
]
