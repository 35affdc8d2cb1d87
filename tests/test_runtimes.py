"""The frozen forward pass in ONNX Runtime (and OpenVINO when installed): TensorFlow's numbers, converted once."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import heads
from pipeline.errors import PipelineError
from pipeline.extract import runtimes
from pipeline.extract import stage as extract

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def _arrays(path):
    with h5py.File(path, "r") as f:
        return f.attrs["runtime"], {
            s: [f[s]["embeddings"][()]] + [f[s]["taps"][n][()] for n in f[s]["taps"]] for s in ("train", "val", "test")
        }


def _extract(cfg, tmp_path, runtime):
    cfg.artifacts = str(tmp_path / runtime)
    cfg.extract.runtime = runtime
    return extract.run(cfg)


OPENVINO_OFF = pytest.mark.xfail(
    reason="OpenVINO 2026.4's CPU plugin is ~7e-4 relative off TensorFlow on this model even with "
    "INFERENCE_PRECISION_HINT=f32 (measured, benchmarks/NOTES.md): why it is opt-in, never the default",
    strict=False,
)


@pytest.mark.parametrize(
    "runtime",
    [
        pytest.param(r, marks=OPENVINO_OFF if r == "openvino" else ())
        for r in ("onnx", "openvino")
        if runtimes.available(r)
    ],
)
@pytest.mark.usefixtures("own_runtimes")
def test_each_runtime_gives_tensorflows_embeddings_and_taps(cfg, tmp_path, runtime):
    cfg.extract.tap_grid = 2  # the portable pooling (crops + global averages) against AdaptivePool too
    tf_run, rt_run = _extract(cfg, tmp_path, "tf"), _extract(cfg, tmp_path, runtime)
    (used_tf, ref), (used, got) = _arrays(tf_run.path), _arrays(rt_run.path)
    assert (used_tf, used) == ("tf", runtime)
    for s in ref:
        assert len(ref[s]) == 2  # the embedding and its tap
        for a, b in zip(ref[s], got[s], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert len(list((tmp_path / runtime / "runtimes").iterdir())) >= 1


@pytest.mark.usefixtures("own_runtimes")
def test_the_converted_model_is_made_once_and_reused_and_its_converter_talks_to_a_log(
    cfg, tmp_path, capfd, caplog, monkeypatch
):
    ref = _arrays(_extract(cfg, tmp_path, "onnx").path)[1]
    out = capfd.readouterr()
    assert "tf2onnx" not in out.out + out.err and "After optimization" not in out.out + out.err
    assert "converted tiny_cnn to ONNX Runtime (cached at" in caplog.text
    logs = list((tmp_path / "onnx" / "runtimes").glob("*.log"))
    assert len(logs) == 1 and "onnx" in logs[0].read_text().lower()  # the converter's chatter, kept
    files = sorted((tmp_path / "onnx" / "runtimes").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    shutil.rmtree(tmp_path / "onnx" / "features")  # extracted again: the same model, not converted again
    from pipeline import backbones

    with monkeypatch.context() as m:  # nor even built: the converted model and its outputs record suffice
        m.setattr(backbones, "build_backbone", lambda *a, **k: pytest.fail("built the Keras model"))
        again = extract.run(cfg)
    used, got = _arrays(again.path)
    assert used == "onnx" and all(np.array_equal(a, b) for s in ref for a, b in zip(ref[s], got[s], strict=True))
    assert sorted((tmp_path / "onnx" / "runtimes").iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_a_conversion_that_fails_in_its_process_is_one_line_naming_its_log(cfg, tmp_path):
    import keras

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
    path = tmp_path / "m.xml"
    with pytest.raises(Exception) as e:
        runtimes.convert_isolated(model, path, "no-such-runtime")
    assert "nothing converts a model for the runtime 'no-such-runtime'" in str(e.value)
    assert str(tmp_path / "m.log") in str(e.value) and "\n" not in str(e.value) and not path.exists()


def test_a_large_model_converts_in_a_child_process_and_a_small_one_in_this_one(tmp_path, monkeypatch, capfd):
    import keras

    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten()])
    isolated = []
    monkeypatch.setattr(runtimes, "convert_isolated", lambda m, path, r: isolated.append(path) or path)
    runtimes.convert_first(model, tmp_path / "small.onnx", "onnx")
    assert isolated == [] and (tmp_path / "small.onnx").exists()
    out = capfd.readouterr()
    assert "tf2onnx" not in out.out + out.err and "tf2onnx" in (tmp_path / "small.log").read_text()  # kept apart
    monkeypatch.setattr(runtimes, "CONVERT_HERE_BELOW", model.count_params())
    runtimes.convert_first(model, tmp_path / "large.onnx", "onnx")
    assert isolated == [tmp_path / "large.onnx"]


class _Node:
    def __init__(self, graph, i):
        self.graph, self.attrs = graph, {"i": i}


class _Graph:
    def __init__(self, n):
        self.nodes = [_Node(self, i) for i in range(n)]


def test_a_conversion_frees_the_graph_copies_it_drops_as_it_goes(tmp_path, monkeypatch):
    """tf2onnx's pattern: each optimisation pass deep-copies the graph (nodes pointing back at it: reference
    cycles) and drops the old copy. Beside many long-lived objects CPython defers the full collections that
    free such copies; the conversion must not let them pile up into its peak memory."""
    import copy
    import gc
    import weakref
    from types import SimpleNamespace

    alive, most = [0], [0]

    def born(graph):
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(graph, lambda: alive.__setitem__(0, alive[0] - 1))

    def exporter(model, tmp, fmt):
        graph = _Graph(2000)
        born(graph)
        for _ in range(60):
            graph = copy.deepcopy(graph)
            born(graph)
        tmp.write_bytes(b"converted")

    long_lived = [[] for _ in range(400_000)]  # TensorFlow's and the model's objects, in a real conversion
    gc.collect()
    monkeypatch.setattr(runtimes, "keras_export", exporter)
    threshold = gc.get_threshold()
    runtimes.convert(SimpleNamespace(input_shape=(None, 8, 8, 3)), tmp_path / "m.onnx", "onnx")
    assert (tmp_path / "m.onnx").read_bytes() == b"converted"
    assert most[0] <= 4, f"{most[0]} graph copies alive at once"
    assert gc.get_threshold() == threshold and gc.get_freeze_count() == 0  # the collector as it was
    del long_lived


def test_a_conversion_failing_in_this_process_leaves_its_error_in_the_log(tmp_path, capfd):
    import keras

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten()])
    with pytest.raises(PipelineError, match="no-such-runtime"):
        runtimes.convert_first(model, tmp_path / "m.xml", "no-such-runtime")
    log = (tmp_path / "m.log").read_text()
    assert "Traceback" in log and "no-such-runtime" in runtimes.last_line(tmp_path / "m.log")
    out = capfd.readouterr()
    assert "Traceback" not in out.out + out.err  # kept in the log, as a child's would be
    print("still here")  # this process's output is its own again
    assert "still here" in capfd.readouterr().out


@pytest.mark.usefixtures("own_runtimes")
def test_a_model_that_fails_to_convert_falls_back_to_tensorflow_with_a_notice(cfg, tmp_path, monkeypatch, caplog):
    def broken(*a, **k):
        raise ValueError("op FancyOp has no ONNX equivalent")

    monkeypatch.setattr(runtimes, "convert", broken)
    res = _extract(cfg, tmp_path, "onnx")
    assert _arrays(res.path)[0] == "tf"
    assert "notice: tiny_cnn cannot be converted for onnx (op FancyOp has no ONNX equivalent)" in caplog.text


def test_heads_read_a_cache_from_either_runtime_alike(cfg, tmp_path):
    cfg.heads.heads = ("ridge", "logreg")
    out = {}
    for runtime in ("tf", "onnx"):
        _extract(cfg, tmp_path, runtime)
        out[runtime] = {(r.head, r.layers): (r.val_accuracy, r.test_pred.tolist()) for r in heads.run(cfg)}
    assert out["tf"] == out["onnx"] and len(out["tf"]) == 4


def test_auto_is_onnx_on_a_cpu_and_tensorflow_on_a_gpu():
    assert runtimes.resolve("auto", gpu=False) == "onnx"
    assert runtimes.resolve("auto", gpu=True) == "tf"
    with pytest.raises(Exception, match="--runtime must be one of"):
        runtimes.resolve("tensorrt", gpu=False)


def test_lite0_taps_in_onnx_equal_tensorflow(tmp_path):
    """The real default backbone at a small input (the conversion and the numbers do not depend on size)."""
    from pipeline import backbones
    from pipeline.backbones import taps

    spec = backbones.get("efficientnet_lite0")
    weights = backbones.resolve_weights(spec, "default", tmp_path, 64)
    base = backbones.build_backbone(spec, weights, 64)
    found = taps.stage_taps(base)
    model = taps.feature_model(spec, base, found)
    onnx, used = runtimes.forward_for(
        "onnx",
        model,
        lambda: taps.feature_model(spec, base, found, portable=True),
        {"backbone": spec.name},
        Path(tmp_path),
    )
    x = np.random.default_rng(0).uniform(0, 255, (4, 64, 64, 3)).astype(np.float32)
    ref = runtimes.tf_forward(model, 64)(x)
    assert used == "onnx" and len(ref) == 1 + len(found)
    for a, b in zip(ref, onnx(x), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_lite0s_portable_model_passes_savedmodels_name_rules(tmp_path):
    """The Lite builder's layer names start with '_' (PyTorch's state-dict names), which SavedModel and so
    LiteRT refuse; the portable copy renames them and keeps the weights."""
    from pipeline import backbones
    from pipeline.backbones import taps

    spec = backbones.get("efficientnet_lite0")
    base = backbones.build_backbone(spec, backbones.resolve_weights(spec, "default", tmp_path, 64), 64)
    found = taps.stage_taps(base)
    portable = taps.feature_model(spec, base, found, portable=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    for a, b in zip(taps.feature_model(spec, base, found)(x), portable(x), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    portable.export(str(tmp_path / "saved_model"), format="tf_saved_model", verbose=False)
    assert (tmp_path / "saved_model" / "saved_model.pb").exists()


def test_artifacts_folders_that_share_a_runtimes_dir_convert_each_model_once(cfg, tmp_path, monkeypatch, caplog):
    from pipeline import backbones
    from pipeline.cli import build_parser

    store = tmp_path / "store"
    cfg.extract.runtimes_dir = str(store)
    first = _extract(cfg, tmp_path, "onnx")
    assert "converted tiny_cnn to ONNX Runtime" in caplog.text and not (tmp_path / "onnx" / "runtimes").exists()
    files = sorted(p.name for p in store.iterdir())
    caplog.clear()
    cfg.artifacts = str(tmp_path / "second")  # another artifacts folder, the same store: nothing converted or built
    with monkeypatch.context() as m:
        m.setattr(backbones, "build_backbone", lambda *a, **k: pytest.fail("built the Keras model"))
        second = extract.run(cfg)
    assert "converted" not in caplog.text and sorted(p.name for p in store.iterdir()) == files
    assert all(
        np.array_equal(a, b)
        for s, arrs in _arrays(first.path)[1].items()
        for a, b in zip(arrs, _arrays(second.path)[1][s], strict=True)
    )
    args = build_parser().parse_args(["extract", "--runtimes-dir", str(store)])
    assert getattr(args, "extract.runtimes_dir") == str(store)
