"""Every head the pipeline knows, as one registry that ``heads``, its memory budget, the curve, the report
and ``predict`` / ``export`` all read, instead of dispatching on head names in each of them.

A ``HeadSpec`` says how to build the estimator for an n x d training matrix (the solver can depend on the
size), which value its validation grid tunes, which heads options its numbers depend on (they go into its
inputs key, so changing one redoes only the heads it affects), whether it streams from the cache or loads
it, whether it is linear in the features (it then folds into one Dense layer for export), how much
memory beyond the features it needs, and its marker in the report's plots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import PipelineError


@dataclass(frozen=True, kw_only=True)
class HeadSpec:
    name: str
    factory: Callable  # (heads settings, seed, n, d) -> estimator; None for the streaming probe
    grid_param: str  # the estimator parameter tuned on validation
    grid_setting: str  # the heads option holding its values
    settings: tuple[str, ...]  # the heads options its numbers depend on (its inputs key)
    marker: str
    streaming: bool = False  # trained on minibatches read from the cache; never loads it whole
    foldable: bool = False  # linear in the features: export folds it into one Dense layer
    val_tuned_only: bool = False  # tuned by its own ``tune`` on validation: no cross-validation fallback
    max_train_setting: str | None = None  # the heads option capping its training images (a stratified subsample)
    working_bytes: Callable = lambda n, n_val, width, h: 0  # beyond the features and their scaled copy


def _large(h, n: int, d: int) -> bool:
    return n * d > h.exact_max_size


def _ridge(h, seed, n, d):
    from pipeline.estimators.linear import RidgeHead

    return RidgeHead()


def _linear_svm(h, seed, n, d):
    from sklearn.svm import LinearSVC

    from pipeline.estimators.linear import LinearHead

    if _large(h, n, d):
        return LinearHead("squared_hinge", batch_size=h.batch_size, seed=seed)
    # liblinear's dual solver when there are fewer images than features, the primal one otherwise
    return LinearSVC(dual=bool(n < d), max_iter=h.max_iter, random_state=seed)


def _logreg(h, seed, n, d):
    from sklearn.linear_model import LogisticRegression

    from pipeline.estimators.linear import LinearHead

    if _large(h, n, d):
        return LinearHead("log", batch_size=h.batch_size, seed=seed)
    return LogisticRegression(solver="lbfgs", max_iter=h.max_iter, warm_start=True)


def _rbf_svm(h, seed, n, d):
    from pipeline.estimators.svm import KernelSVC

    return KernelSVC()


def _nystroem(h, seed, n, d):
    from pipeline.estimators.nystroem import NystroemHead

    return NystroemHead(n_components=h.nystroem_components, batch_size=h.batch_size, seed=seed)


def _nystroem_bytes(n, n_val, width, h):
    m = min(h.nystroem_components, n)  # the mapped train + val, the landmarks, the m x m SVD
    return (n + n_val) * m * 4 * 2 + m * width * 4 + 4 * m * m * 8


def _knn(h, seed, n, d):
    from pipeline.estimators.knn import CosineKNN

    return CosineKNN()


def _mlp(h, seed, n, d):
    from pipeline.estimators.mlp import KerasMLP

    return KerasMLP(hidden=h.mlp_hidden, seed=seed)


def _exact_solver_bytes(n, n_val, width, h):
    """scikit-learn's exact solvers take a float64 copy; the minibatch solver reads the float32 one."""
    return n * width * 8 if n * width <= h.exact_max_size else 0


def _rbf_bytes(n, n_val, width, h):
    m = min(h.rbf_max_train, n)  # the float64 kernel, the float16 val kernel, the subsample
    return m * m * 8 + n_val * m * 2 + m * width * 4


_LINEAR_SETTINGS = ("c_grid", "exact_max_size", "batch_size", "max_iter")


def _linear(name: str, factory: Callable, marker: str) -> HeadSpec:
    """logreg and linear_svm: one C grid, the same solvers and memory, foldable into a Dense layer."""
    return HeadSpec(
        name=name,
        factory=factory,
        grid_param="C",
        grid_setting="c_grid",
        settings=_LINEAR_SETTINGS,
        marker=marker,
        foldable=True,
        working_bytes=_exact_solver_bytes,
    )


REGISTRY: dict[str, HeadSpec] = {
    s.name: s
    for s in (
        HeadSpec(
            name="ridge",
            factory=_ridge,
            grid_param="alpha",
            grid_setting="alpha_grid",
            settings=("alpha_grid",),
            marker="D",
            foldable=True,
            working_bytes=lambda n, n_val, width, h: 3 * width * width * 8,
        ),
        _linear("logreg", _logreg, "^"),
        _linear("linear_svm", _linear_svm, "s"),
        HeadSpec(
            name="rbf_svm",
            factory=_rbf_svm,
            grid_param="C",
            grid_setting="c_grid",
            settings=("c_grid", "rbf_max_train"),
            marker="o",
            working_bytes=_rbf_bytes,
            max_train_setting="rbf_max_train",
        ),
        HeadSpec(
            name="nystroem",
            factory=_nystroem,
            grid_param="C",
            grid_setting="c_grid",
            settings=("c_grid", "nystroem_components", "batch_size"),
            marker="d",
            working_bytes=_nystroem_bytes,
        ),
        HeadSpec(
            name="mlp",
            factory=_mlp,
            grid_param="dropout",
            grid_setting="mlp_dropout",
            settings=("mlp_hidden", "mlp_dropout"),
            marker="P",
            val_tuned_only=True,
            working_bytes=lambda n, n_val, width, h: n * width * 4,
        ),
        HeadSpec(
            name="knn",
            factory=_knn,
            grid_param="n_neighbors",
            grid_setting="k_grid",
            settings=("k_grid",),
            marker="v",
            val_tuned_only=True,
            working_bytes=lambda n, n_val, width, h: n * width * 4,
        ),
        HeadSpec(
            name="linear_probe",
            factory=None,
            grid_param="decay",
            grid_setting="probe_decays",
            settings=("probe_decays", "probe_epochs", "batch_size"),
            marker="X",
            streaming=True,
        ),
    )
}
IN_MEMORY = tuple(n for n, s in REGISTRY.items() if not s.streaming)
STREAMING = tuple(n for n, s in REGISTRY.items() if s.streaming)


def get(name: str) -> HeadSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PipelineError(f"unknown head '{name}' (known: {', '.join(REGISTRY)})") from None


def check(names) -> None:
    """Refuse unknown head names, all of them named in one line."""
    bad = [h for h in names if h not in REGISTRY]
    if bad:
        raise PipelineError(f"unknown head(s) {', '.join(bad)} (known: {', '.join(REGISTRY)})")
