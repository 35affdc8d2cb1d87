"""Lossless images decoded without TensorFlow give exactly TensorFlow's pixels, and an extraction whose
model is on the lean path (converted once, in a child) never imports TensorFlow."""

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.data import decode, load_image


@pytest.mark.parametrize(
    ("mode", "shape", "size", "ext"),
    [
        ("L", (28, 28), 112, "png"),  # Fashion-MNIST: gray, upsampled 4x
        ("RGB", (300, 200), 112, "png"),  # downsampled, not square
        ("RGBA", (57, 91), 224, "png"),
        ("P", (40, 30), 64, "png"),
        ("RGB", (33, 47), 96, "bmp"),
        ("L", (28, 28), 28, "png"),  # no resize: every output row an exact source row
        ("RGB", (120, 20), 112, "png"),  # more rows than the output (downscaled), fewer columns
        ("RGB", (20, 500), 224, "png"),  # fewer rows (upscaled), more columns
    ],
)
def test_pillow_and_numpy_give_tensorflows_pixels_bit_for_bit(tmp_path, mode, shape, size, ext):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (*shape, 4), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGBA") if mode == "RGBA" else Image.fromarray(pixels[..., :3]).convert(mode)
    path = str(tmp_path / f"x.{ext}")
    img.save(path)
    assert np.array_equal(decode.load(path, size), load_image(path, size).numpy())


def test_a_16_bit_image_goes_to_tensorflows_decoder_and_a_broken_one_is_left_out(tmp_path):
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert np.array_equal(decode.load(str(deep), 32), load_image(str(deep), 32).numpy())
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:40])
    batches = list(decode.batches([str(good), str(broken), str(good)], 16, batch_size=2))
    assert [list(index) for _, index in batches] == [[0], [2]]  # the gap says which was unreadable
    assert decode.lossless(["a.PNG", "b.bmp"]) and not decode.lossless(["a.png", "b.jpg"])


LEAN = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # the tiny backbone
from pipeline.cli import main
{patch}
main(["extract", "--dataset", {data!r}, "--artifacts", {art!r}, "--backbone", conftest.TINY, "--weights", "none",
      "--runtime", "onnx", "--input-size", "16"] + {extra!r})
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


EXECS = """
import pipeline.extract.runtimes as r
real_exec = r.exec_convert
def exec_convert(*a):
    open({marker!r}, "w").close()
    real_exec(*a)
r.exec_convert = exec_convert
"""


def _lean_run(tmp_path, presplit, extra=(), patch="", art="a"):
    code = LEAN.format(
        tests=str(Path(__file__).parent), data=str(presplit), art=str(tmp_path / art), extra=list(extra), patch=patch
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()[-1], run.stderr


@pytest.mark.slow
def test_an_extraction_on_the_lean_path_never_imports_tensorflow_not_even_the_first_converting_one(tmp_path, presplit):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    marker = tmp_path / "exec-convert-called"
    patch = EXECS.format(marker=str(marker))
    seen = [_lean_run(tmp_path, presplit, extra, patch)[0] for extra in ([], ["--force"])]
    assert seen == ["tensorflow imported: False", "tensorflow imported: False"]  # the first converts in a child
    assert not marker.exists()  # a small model is converted by the child that built it: one TensorFlow import
    # a large one by a fresh interpreter that the child becomes (the limit lowered: the tiny model is large)
    seen = _lean_run(tmp_path, presplit, patch=patch + "r.CONVERT_HERE_BELOW = 0", art="b")[0]
    assert seen == "tensorflow imported: False" and marker.exists()
    for art in ("a", "b"):
        converted = list((tmp_path / art / "runtimes").glob("*.onnx"))
        assert len(converted) == 1 and converted[0].with_suffix(".outputs.json").exists()
        assert not list((tmp_path / art / "runtimes").glob(".convert-*"))  # the converter's folder removed
        cache = next((tmp_path / art / "features").rglob("*.h5"))
        with h5py.File(cache) as f:
            assert f.attrs["runtime"] == "onnx"


@pytest.mark.slow
def test_a_first_conversion_that_fails_in_its_child_runs_the_keras_model_with_a_notice(tmp_path, presplit):
    pytest.importorskip("onnxruntime")
    broken = "import pipeline.backbones.taps as t\nreal = t.feature_model\n"  # fails in the converting child
    broken += "def fail(*a, portable=False):\n    if portable: raise ValueError('op FancyOp has no ONNX form')\n"
    broken += "    return real(*a)\nt.feature_model = fail"
    seen, err = _lean_run(tmp_path, presplit, patch=broken)
    assert seen == "tensorflow imported: True"
    assert "notice: tiny_cnn cannot be converted for onnx (ValueError: op FancyOp has no ONNX form)" in err
    assert not list((tmp_path / "a" / "runtimes").glob("*.onnx"))
    assert not list((tmp_path / "a" / "runtimes").glob(".convert-*"))  # nothing left behind
