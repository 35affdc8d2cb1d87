"""The preprocessing layer, kept in the graph so saved fine-tuned models carry it."""

from __future__ import annotations

import keras

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
