"""Taps: pooled embeddings of intermediate backbone layers, from the same forward pass.

The final layer of an ImageNet model is its most ImageNet-specific one; on data
far from ImageNet earlier stages often transfer better (Head2Toe, Evci et al.
2022). The default taps are found from the graph, so they exist for every
functional Keras model: one per resolution stage, the last layer (in
topological order) whose output still has that spatial size, i.e. the
representation just before the network down-samples. The smallest resolution
is covered by the final embedding itself. Each tap is average-pooled globally,
or to a ``grid`` x ``grid`` layout then flattened, and returned in float32.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STAGES = "stages"
NONE = "none"


@dataclass(frozen=True)
class Tap:
    layer: str
    shape: tuple[int, ...]  # (H, W, C) for spatial layers, (C,) for vector ones
    grid: int = 1

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 3

    @property
    def width(self) -> int:
        return self.shape[-1] * (self.grid * self.grid if self.spatial else 1)


def candidates(base) -> list[Tap]:
    """Every layer with one spatial (N, H, W, C) output, in topological order.

    Image-like tensors (input, rescaling: C <= 3) and zero-padding (the same
    values plus a border) are not features worth pooling.
    """
    import keras

    skip = (keras.layers.InputLayer, keras.layers.ZeroPadding2D, keras.layers.Cropping2D)
    out = []
    for layer in base.layers:
        if isinstance(layer, skip):
            continue
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError):  # shared layers with several outputs
            continue
        if len(shape) == 4 and shape[-1] is not None and shape[-1] > 3 and None not in shape[1:3]:
            out.append(Tap(layer.name, tuple(int(s) for s in shape[1:])))
    return out


def stage_taps(base) -> list[Tap]:
    """The last layer of each resolution stage, the final stage excepted (the embedding covers it).

    A stage is an octave of down-sampling, round(log2(input side / side)), so
    valid convolutions that trim a border (Inception) do not start a new one.
    Stages are kept only where resolution falls monotonically towards the
    final layer, which drops squeeze-excite side branches (1 x 1 maps).
    """
    side = int(base.input_shape[1] or 0)
    last: dict[int, Tap] = {}
    for tap in candidates(base):
        octave = round(math.log2(side / tap.shape[0])) if side else tap.shape[0]
        last.pop(octave, None)  # re-insert: the order is where each stage *ends*
        last[octave] = tap
    chain: list[tuple[int, Tap]] = []
    for octave, tap in reversed(last.items()):
        if not chain or octave < chain[-1][0]:
            chain.append((octave, tap))
    return [tap for _, tap in reversed(chain[1:])]


def resolve(base, requested: tuple[str, ...] | list[str], grid: int = 1, backbone: str = "") -> list[Tap]:
    """``stages`` (the default set), ``none``, or layer names of ``base``, with the pooling grid."""
    if grid < 1:
        raise PipelineError(f"--tap-grid must be >= 1, not {grid}")
    requested = list(requested)
    if not requested or requested == [NONE]:
        return []
    found: list[Tap] = []
    names = {t.layer: t for t in candidates(base)}
    for name in requested:
        if name == STAGES:
            found.extend(stage_taps(base))
            continue
        if name in names:
            found.append(names[name])
            continue
        try:
            layer = base.get_layer(name)
        except ValueError:
            hint = f"`python -m pipeline backbones --taps {backbone}`" if backbone else "`backbones --taps`"
            raise PipelineError(f"backbone has no layer '{name}' to tap; {hint} lists the candidates") from None
        shape = tuple(layer.output.shape)
        if len(shape) != 2:
            raise PipelineError(f"layer '{name}' has output shape {shape}; taps need (N, H, W, C) or (N, C)")
        found.append(Tap(name, (int(shape[1]),)))
    return list(dict.fromkeys(Tap(t.layer, t.shape, grid if t.spatial else 1) for t in found))


def adaptive_pool(x, grid: int):
    """Average-pool (N, H, W, C) into ``grid`` x ``grid`` bins (PyTorch's adaptive bins), flattened."""
    from keras import ops

    cells = [ops.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)) for r0, r1, c0, c1 in grid_cells(x.shape, grid)]
    return ops.concatenate(cells, axis=-1)


def grid_cells(shape, grid: int) -> list[tuple[int, int, int, int]]:
    """(row start, row end, column start, column end) of each bin, row-major: PyTorch's adaptive bins."""
    h, w = int(shape[1]), int(shape[2])
    rows = [((i * h) // grid, -(-((i + 1) * h) // grid)) for i in range(grid)]
    cols = [((j * w) // grid, -(-((j + 1) * w) // grid)) for j in range(grid)]
    return [(r0, r1, c0, c1) for r0, r1 in rows for c0, c1 in cols]


def _adaptive_pool_layer():
    """``adaptive_pool`` as a registered Keras layer, so a feature model round-trips through its config
    (the Ray engine ships models to its actors that way)."""
    import keras

    @keras.saving.register_keras_serializable(package="pipeline")
    class AdaptivePool(keras.layers.Layer):
        def __init__(self, grid: int = 1, **kw):
            super().__init__(**kw)
            self.grid = grid

        def call(self, x):
            return adaptive_pool(x, self.grid)

        def compute_output_shape(self, shape):
            return (shape[0], shape[-1] * self.grid * self.grid)

        def get_config(self):
            return {**super().get_config(), "grid": self.grid}

    return AdaptivePool


_POOL: list = []


def pool_class():
    """The AdaptivePool layer class, defined (and registered with Keras) on first use."""
    if not _POOL:
        _POOL.append(_adaptive_pool_layer())
    return _POOL[0]


def pool_layer(grid: int, name: str):
    return pool_class()(grid, name=name)


def feature_model(spec, base, taps: list[Tap], portable: bool = False):
    """Raw RGB 0-255 in; [final embedding, tap 1, tap 2, ...] out (float32), one forward pass.

    With no taps the model has the one output (the pipeline's only feature model: extraction, the
    runtimes, predict and export all build it here). ``portable``: only built-in Keras layers (the
    preprocessing as a ``Dense`` on the channels, the pooling as crops + global averages), so an exported
    model loads where this package is not installed; same numbers.
    """
    import keras

    if not taps:
        if portable:
            base = portable_base(base)[0]
        inputs = keras.Input(shape=base.input_shape[1:], name="image")
        x = base(preprocess_layer(spec, portable)(inputs), training=False)
        embedding = keras.layers.Activation("linear", dtype="float32", name="embedding")(x)
        return keras.Model(inputs, embedding, name=f"{spec.name}_features")
    names = {t.layer: t.layer for t in taps}
    if portable:
        base, names = portable_base(base)
    inner = keras.Model(base.inputs, [base.output] + [base.get_layer(names[t.layer]).output for t in taps])
    inputs = keras.Input(shape=base.input_shape[1:], name="image")
    outs = inner(preprocess_layer(spec, portable)(inputs), training=False)
    pooled = [keras.layers.Activation("linear", dtype="float32", name="embedding")(outs[0])]
    for k, (tap, out) in enumerate(zip(taps, outs[1:])):
        if tap.spatial:
            out = (
                portable_pool(out, tap.grid, f"tap{k}_pool") if portable else pool_layer(tap.grid, f"tap{k}_pool")(out)
            )
        pooled.append(keras.layers.Activation("linear", dtype="float32", name=f"tap{k}")(out))
    return keras.Model(inputs, pooled, name=f"{spec.name}_features_taps")


def portable_base(base):
    """(a copy of ``base`` whose layer names every exporter accepts, {old name: new name}). TensorFlow's
    SavedModel (and so LiteRT) refuses variable scopes that start with ``_``, which the Lite builder uses to
    mirror the PyTorch state-dict names; the copy has the same weights under names without them."""
    import keras

    rename, taken = {}, set()
    for layer in base.layers:
        new = layer.name.lstrip("_") or "layer"
        while new in taken:
            new += "_"
        taken.add(new)
        rename[layer.name] = new
    if all(k == v for k, v in rename.items()):
        return base, rename

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "name": rename[layer.name]})

    copy = keras.models.clone_model(base, clone_function=clone)
    for old in (layer for layer in base.layers if layer.weights):  # by name: robust to any weight order
        new = copy.get_layer(rename[old.name])
        values = {v.name: v for v in old.weights}
        for v in new.weights:
            v.assign(values[v.name])
    return copy, rename


def preprocess_layer(spec, portable: bool = False):
    """The backbone's preprocessing: the registered layer, or (``portable``) a built-in ``Dense`` doing the
    same affine map; a preprocessing that is not affine stays the registered layer, with a notice."""
    from pipeline.backbones.layers import Preprocess, portable_preprocess

    if portable:
        layer = portable_preprocess(spec.preprocess_kind)
        if layer is not None:
            return layer
        log.warning(
            "notice: %s's preprocessing is not a per-pixel affine map; the export keeps its own layer, "
            "so loading it needs this package",
            spec.name,
        )
    return Preprocess(spec.preprocess_kind, name="preprocess")


def portable_pool(x, grid: int, name: str):
    """``adaptive_pool`` from built-in layers: one crop + global average per cell, concatenated."""
    import keras

    if grid == 1:
        return keras.layers.GlobalAveragePooling2D(name=name)(x)
    h, w = int(x.shape[1]), int(x.shape[2])
    cells = []
    for k, (r0, r1, c0, c1) in enumerate(grid_cells(x.shape, grid)):
        crop = keras.layers.Cropping2D(((r0, h - r1), (c0, w - c1)), name=f"{name}_crop{k}")(x)
        cells.append(keras.layers.GlobalAveragePooling2D(name=f"{name}_cell{k}")(crop))
    return keras.layers.Concatenate(name=name)(cells)


def describe(base) -> list[tuple[str, str, bool]]:
    """(layer, shape, is-default) for every candidate: what `backbones --taps` prints."""
    default = {t.layer for t in stage_taps(base)}
    rows = [(t.layer, "x".join(map(str, t.shape)), t.layer in default) for t in candidates(base)]
    rows.append((base.layers[-1].name, "x".join(map(str, tuple(base.output.shape)[1:])) + " (final embedding)", False))
    return rows
