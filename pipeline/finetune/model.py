"""The fine-tuned model: raw RGB -> augmentation -> preprocessing -> backbone -> dropout -> softmax, and
which of its layers train in each phase.

BatchNorm layers must stay in inference mode when unfrozen: in Keras 3 ``fit`` overrides the
``training=False`` of ``base(x, training=False)`` (keras-team/keras#20285), so they are also kept
``trainable=False``, which is what makes BatchNormalization use its moving statistics.
"""

from __future__ import annotations

from pipeline import backbones
from pipeline.data.augment import augmentation_layers
from pipeline.errors import PipelineError


def build_model(
    base, spec: backbones.BackboneSpec, n_classes: int, augment: tuple[str, ...], seed: int, dropout: float
):
    """raw RGB -> [augmentation] -> preprocessing -> base(training=False) -> dropout -> softmax."""
    import keras
    from keras import layers

    from pipeline.backbones.layers import Preprocess

    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    x = inputs
    for layer in augmentation_layers(augment, seed):
        x = layer(x)  # active only while training
    x = Preprocess(spec.preprocess_kind, name="preprocess")(x)
    x = base(x, training=False)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name=f"{spec.name}_finetuned")


def set_trainable(base, phase: int, unfreeze_layers: int) -> int:
    """Phase 1: all frozen. Phase 2: the top ``unfreeze_layers`` layers (or all), BatchNorm
    excepted. Returns how many layers were unfrozen."""
    from keras import layers

    if phase == 1:
        base.trainable = False
        return 0
    base.trainable = True
    with_weights = [layer for layer in base.layers if layer.weights]
    n = len(with_weights) if unfreeze_layers < 0 else min(unfreeze_layers, len(with_weights))
    for layer in with_weights[: len(with_weights) - n]:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False
    return n


def optimizer_named(name: str, lr):
    """A fresh optimizer by Keras name; ``lr`` a number or a ``LearningRateSchedule``."""
    import keras

    try:
        opt = keras.optimizers.get(name)
    except ValueError:
        raise PipelineError(f"unknown optimizer '{name}'") from None
    return type(opt).from_config({**opt.get_config(), "learning_rate": lr})
