"""The scikit-learn estimator contract for the project's own heads, in one place.

scikit-learn's ``check_estimator`` is the definition of "a scikit-learn estimator": inputs
validated the same way (NaN / inf, empty, sparse, complex, 1-D and mismatched X / y refused with
scikit-learn's own messages), ``n_features_in_`` recorded, ``NotFittedError`` before ``fit``.
Every custom head calls these two functions instead of converting its inputs by hand.
Validation keeps float32 inputs as they are (no copy of a 50,000-row matrix); it adds one
finiteness pass over the data.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data


def fit_data(est, X, y) -> tuple[np.ndarray, np.ndarray]:
    """X as float32 and y checked as class labels; records ``n_features_in_`` on ``est``."""
    X, y = validate_data(est, X, y, dtype=np.float32, reset=True)
    check_classification_targets(y)
    return X, y


def predict_data(est, X) -> np.ndarray:
    """X as float32, after checking ``est`` is fitted and X has the width it was fitted on."""
    check_is_fitted(est)
    return validate_data(est, X, dtype=np.float32, reset=False)


def binary_scores(Z: np.ndarray) -> np.ndarray:
    """Per-class scores as ``decision_function`` returns them: one column (positive: ``classes_[1]``)
    when there are two classes, as every scikit-learn classifier does."""
    return Z[:, 1] - Z[:, 0] if Z.shape[1] == 2 else Z
