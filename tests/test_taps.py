"""Taps: intermediate layers pooled in the same forward pass, cached per split, keyed."""

import h5py
import numpy as np
import pytest
from conftest import TINY

from pipeline import backbones
from pipeline.backbones import taps
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def _taps(path):
    with h5py.File(path, "r") as f:
        return {s: {n: f[s]["taps"][n][()] for n in f[s]["taps"]} for s in ("train", "val", "test") if "taps" in f[s]}


def test_default_taps_are_the_stage_outputs_pooled_from_the_same_pass(cfg):
    res = extract.run(cfg)
    with h5py.File(res.path, "r") as f:
        d = f["train"]["taps"]["bn1"]
        assert d.shape == (18, 8) and d.attrs["width"] == 8 and d.attrs["layer"] == "bn1"
        assert list(d.attrs["shape"]) == [7, 7, 8]
        assert f["train"]["embeddings"].shape == (18, 16)  # the final embedding keeps its place
        ids = f["train"]["ids"].asstr()[()]
        tap = d[()]

    import keras

    from pipeline.data import image_dataset

    spec = backbones.get(TINY)
    base = backbones.build_backbone(spec, backbones.resolve_weights(spec, "none", cfg.artifacts), 16, cfg.data.seed)
    inner = keras.Model(base.inputs, base.get_layer("bn1").output)
    img, _ = next(iter(image_dataset([f"{cfg.data.dataset}/{ids[0]}"], 16, 1)))  # decoded as extract does
    expected = np.asarray(inner(img / 255.0)).mean(axis=(1, 2))[0]
    np.testing.assert_allclose(tap[0], expected, rtol=1e-4, atol=1e-5)


def test_tap_grid_flattens_a_2x2_average(cfg):
    cfg.extract.tap_grid = 2
    res = extract.run(cfg)
    assert _taps(res.path)["val"]["bn1"].shape == (9, 32)
    x = np.arange(2 * 7 * 7 * 3, dtype=np.float32).reshape(2, 7, 7, 3)
    got = np.asarray(taps.adaptive_pool(x, 2))
    top_left = x[:, 0:4, 0:4, :].mean(axis=(1, 2))  # PyTorch's adaptive bins: 0..3 and 3..6 overlap on 7
    bottom_right = x[:, 3:7, 3:7, :].mean(axis=(1, 2))
    np.testing.assert_allclose(got[:, :3], top_left, rtol=1e-6)
    np.testing.assert_allclose(got[:, 9:], bottom_right, rtol=1e-6)


def test_tap_cache_hit_needs_no_forward_pass_and_other_taps_are_another_variant(cfg, monkeypatch, caplog):
    first = extract.run(cfg)
    with monkeypatch.context() as m:
        m.setattr(backbones, "build_backbone", lambda *a, **k: pytest.fail("built a model on a cache hit"))
        assert extract.run(cfg).cache_hit
    cfg.extract.taps = ("conv1",)
    second = extract.run(cfg)
    assert not second.cache_hit and second.path != first.path and "re-extracting" not in caplog.text
    assert set(_taps(second.path)["train"]) == {"conv1"}
    cfg.extract.taps = ("none",)
    third = extract.run(cfg)
    assert not third.cache_hit and _taps(third.path) == {} and len({first.path, second.path, third.path}) == 3
    assert set(_taps(first.path)["train"]) and set(_taps(second.path)["train"]) == {"conv1"}  # both kept


def test_unknown_tap_is_one_line_naming_the_listing_command(cfg):
    cfg.extract.taps = ("block99",)
    with pytest.raises(
        PipelineError, match=r"no layer 'block99' to tap; `python -m pipeline backbones --taps tiny_cnn`"
    ):
        extract.run(cfg)


def test_lite0_stage_taps_have_the_stage_widths():
    spec = backbones.get("efficientnet_lite0")
    base = spec.build(None, 64)
    found = taps.stage_taps(base)
    assert [t.width for t in found] == [96, 144, 240, 672]
    assert [t.shape[0] for t in found] == [32, 16, 8, 4]  # one per resolution, the final (2 x 2) excepted
    model = taps.feature_model(spec, base, found)
    outs = model(np.zeros((2, 64, 64, 3), np.float32))
    assert [tuple(o.shape) for o in outs] == [(2, 1280), (2, 96), (2, 144), (2, 240), (2, 672)]


def test_stage_taps_skip_padding_and_squeeze_excite_branches():
    import keras

    base = keras.applications.MobileNetV2(include_top=False, weights=None, pooling="avg", input_shape=(96, 96, 3))
    names = [t.layer for t in taps.stage_taps(base)]
    assert names == ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu"]
    base = keras.applications.EfficientNetB0(include_top=False, weights=None, pooling="avg", input_shape=(96, 96, 3))
    assert all("pad" not in n and "_se_" not in n for n in (t.layer for t in taps.stage_taps(base)))


def test_cli_lists_tap_candidates_with_shapes_and_defaults(capsys):
    from pipeline.cli import main

    assert main(["backbones", "--taps", TINY]) == 0
    out = capsys.readouterr().out
    assert "* bn1" in out and "7x7x8" in out and "(final embedding)" in out


def test_grid_pooling_of_a_constructed_activation_in_both_forms():
    """A known activation (its values are their own positions) pooled 3x3 on a 7x7 map: each cell is the
    mean over PyTorch's adaptive bins, and the portable form (crops + global averages) gives the same."""
    import keras

    x = np.arange(7 * 7 * 2, dtype=np.float32).reshape(1, 7, 7, 2)
    cells = taps.grid_cells(x.shape, 3)
    assert cells[0] == (0, 3, 0, 3) and cells[4] == (2, 5, 2, 5) and cells[8] == (4, 7, 4, 7)
    expected = np.concatenate([x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)) for r0, r1, c0, c1 in cells], axis=-1)
    np.testing.assert_allclose(np.asarray(taps.adaptive_pool(x, 3)), expected, rtol=1e-6)
    inp = keras.Input((7, 7, 2))
    portable = keras.Model(inp, taps.portable_pool(inp, 3, "pool"))
    np.testing.assert_allclose(portable(x).numpy(), expected, rtol=1e-6)
    assert expected[0, 0] == x[0, 0:3, 0:3, 0].mean() == 8 * 2  # the centre of the top-left 3x3 bin: (1, 1) -> 16
