"""The scikit-learn estimators the heads are made of, one family a module as scikit-learn groups its own:
``linear`` (exact ridge; logistic / squared-hinge heads along a regularization path), ``svm`` (RBF on a
precomputed float32 kernel), ``nystroem`` (RBF at scale), ``knn`` (cosine), ``mlp`` (Keras, imported only
when fitted), with ``contract`` (input checks every one shares) and ``tuning`` (validation-split search,
also used by the fine-tune's learning-rate grid). No TensorFlow at import and no pipeline stage below them:
they are the library the stages use.
"""

from pipeline.estimators.knn import CosineKNN
from pipeline.estimators.linear import LinearHead, RidgeHead
from pipeline.estimators.mlp import KerasMLP
from pipeline.estimators.nystroem import NystroemHead
from pipeline.estimators.svm import KernelSVC, rbf_kernel32

__all__ = ["CosineKNN", "KerasMLP", "KernelSVC", "LinearHead", "NystroemHead", "RidgeHead", "rbf_kernel32"]
