"""The augmentation layers of the fine-tune, shared with extraction's augmented views (``--views``), so
both sides of the comparison see the same kind of augmented images."""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError

AUGMENT_SEEDS = "independent per layer"  # in the inputs keys: results from the shared-seed recipe are redone


def augmentation_layers(names: tuple[str, ...], seed: int) -> list:
    """The Keras augmentation layers named in ``finetune.augment`` (also used for cached views), each with
    its own seed derived from the run's: one shared seed would make their draws move together."""
    from keras import layers

    aug = {
        "flip": lambda s: layers.RandomFlip("horizontal", seed=s),
        "zoom": lambda s: layers.RandomZoom(0.1, seed=s),
        "translate": lambda s: layers.RandomTranslation(0.1, 0.1, seed=s),
    }
    unknown = [a for a in names if a not in aug]
    if unknown:
        raise PipelineError(f"unknown augmentation(s) {', '.join(unknown)} (known: {', '.join(aug)})")
    seeds = np.random.SeedSequence(seed).generate_state(len(names))
    return [aug[name](int(s)) for name, s in zip(names, seeds, strict=True)]


def augmentation(names: tuple[str, ...], seed: int):
    """The augmentation layers as one Sequential model (extraction's views pass)."""
    import keras

    return keras.Sequential(augmentation_layers(names, seed), name="view_augmentation")
