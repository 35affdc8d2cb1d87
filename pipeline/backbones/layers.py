"""The preprocessing layer, kept in the graph so saved fine-tuned models carry it.

For exported models (``pipeline.apply.export``) the same preprocessing is also available as a plain Keras
``Dense`` on the channel axis: every preprocessing here is a per-pixel affine map of RGB (scaling,
mean/std, a channel swap), so an exported model loads with Keras alone.
"""

from __future__ import annotations

import keras
import numpy as np

from pipeline.backbones import efficientnet_lite


def preprocess_fn(kind: str):
    if kind == "efficientnet_lite":
        return efficientnet_lite.preprocess_input
    if kind == "unit":
        return lambda x: x / 255.0
    if kind == "none":
        return lambda x: x
    if kind.startswith("mode_"):  # tf / torch / caffe conventions of keras.applications.imagenet_utils
        return lambda x: keras.applications.imagenet_utils.preprocess_input(x, mode=kind.removeprefix("mode_"))
    return getattr(keras.applications, kind).preprocess_input


@keras.saving.register_keras_serializable(package="pipeline")
class Preprocess(keras.layers.Layer):
    """Maps RGB 0-255 images to what the backbone was trained on.

    ``kind`` is ``efficientnet_lite``, ``unit`` (x/255), ``none`` or the
    ``keras.applications`` module whose ``preprocess_input`` to use.
    """

    def __init__(self, kind: str, **kw):
        super().__init__(**kw)
        self.kind = kind
        self._fn = preprocess_fn(kind)

    def call(self, x):
        return self._fn(x)

    def get_config(self):
        return {**super().get_config(), "kind": self.kind}


def portable_preprocess(kind: str, name: str = "preprocess"):
    """The preprocessing as a built-in ``Dense(3)`` over the channel axis (y = x M + t, found by probing the
    function with the basis colours), or None when it is not such a map."""
    fn = preprocess_fn(kind)
    probe = np.vstack([np.zeros(3), np.eye(3), np.random.default_rng(0).uniform(0, 255, (4, 3))]).astype(np.float32)
    out = np.asarray(fn(keras.ops.convert_to_tensor(probe.reshape(1, 1, -1, 3)))).reshape(-1, 3).astype(np.float64)
    t = out[0]
    M = out[1:4] - t
    if not np.allclose(probe[4:] @ M + t, out[4:], rtol=1e-5, atol=1e-4):
        return None
    layer = keras.layers.Dense(3, name=name, dtype="float32")
    layer.build((None, None, None, 3))
    layer.set_weights([M.astype(np.float32), t.astype(np.float32)])
    return layer
