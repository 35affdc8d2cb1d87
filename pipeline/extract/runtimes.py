"""How a frozen feature model runs: TensorFlow, ONNX Runtime or OpenVINO, same model, same numbers.

On CPUs the same feature model runs faster in ONNX Runtime than in TensorFlow (``benchmarks/NOTES.md``),
with embeddings equal within 1e-4 relative. The model is converted once per feature model (``model_key``)
by Keras' own ``Model.export`` (from built-in layers only, see ``taps.feature_model(portable=True)``)
in a child process whose output goes to a log beside it, stored under ``artifacts/runtimes/`` and reused. A model the
exporter cannot convert falls back to TensorFlow with a one-line notice. On a GPU TensorFlow stays the
default (``auto``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline import resources
from pipeline.artifacts import atomic_path, write_json_atomic
from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "tf", "onnx", "openvino")
NAMES = {"tf": "TensorFlow", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}
Forward = Callable[[np.ndarray], list[np.ndarray]]


def available(runtime: str) -> bool:
    module = {"tf": "tensorflow", "onnx": "onnxruntime", "openvino": "openvino"}[runtime]
    extra = ("tf2onnx", "onnx") if runtime == "onnx" else ()
    return all(importlib.util.find_spec(m) is not None for m in (module, *extra))


def resolve(runtime: str, gpu: bool) -> str:
    """``auto``: TensorFlow on a GPU, else ONNX Runtime when installed (the faster on CPU)."""
    if runtime not in RUNTIMES:
        raise PipelineError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime}")
    if runtime == "auto":
        return "tf" if gpu or not available("onnx") else "onnx"
    if not available(runtime):
        extra = {"onnx": "onnxruntime tf2onnx onnx", "openvino": "openvino"}.get(runtime, "tensorflow")
        raise PipelineError(f"--runtime {runtime} needs {extra}: pip install {extra}")
    return runtime


def tf_forward(model, size: int) -> Forward:
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)], reduce_retracing=True)
    def forward(x):
        out = model(x, training=False)
        return out if isinstance(out, list | tuple) else [out]

    return lambda x: [o.numpy().astype(np.float32, copy=False) for o in forward(x)]


MODEL_KEY = ("backbone", "weights_sha256", "input_size", "preprocessing", "taps")  # what the converted model is


def model_key(cache_key: dict) -> dict:
    """The part of a cache's key that defines its feature model: one conversion serves every dataset."""
    return {k: cache_key.get(k) for k in MODEL_KEY}


def store(artifacts: str | Path, runtimes_dir: str = "") -> Path:
    """The folder converted models live in: ``runtimes_dir`` when set, else the artifacts' own."""
    return Path(runtimes_dir) if runtimes_dir else Path(artifacts) / "runtimes"


def converted_path(folder: Path, key: dict, runtime: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(folder) / f"{key.get('backbone', 'model')}-{digest}.{'onnx' if runtime == 'onnx' else 'xml'}"


def keras_export(model, path: Path, fmt: str) -> None:
    """``Model.export`` (or ``save`` for ``keras``) of a model that has run once, as the exporters want;
    a missing exporter package is a one-line error naming it."""
    dummy = [np.zeros((1, *(d or 8 for d in i.shape[1:])), np.float32) for i in model.inputs]  # None: any size
    model(dummy[0] if len(dummy) == 1 else dummy)
    if fmt == "keras":
        model.save(path)
        return
    try:
        model.export(str(path), format="tf_saved_model" if fmt == "saved_model" else fmt, verbose=False)
    except ImportError as e:
        extra = {"onnx": "tf2onnx onnx", "litert": "ai-edge-litert"}.get(fmt, fmt)
        raise PipelineError(f"--format {fmt} needs {extra}: pip install {extra} ({e})") from None


def convert(portable_model, path: Path, runtime: str) -> Path:
    """The model in ``runtime``'s format at ``path``, written atomically (in this process)."""
    if runtime not in ("onnx", "openvino"):
        raise PipelineError(f"nothing converts a model for the runtime '{runtime}'")
    size = portable_model.input_shape[1]
    with collecting_early():
        if runtime == "onnx":
            with atomic_path(path, suffix=".onnx") as tmp:
                keras_export(portable_model, tmp, "onnx")
        else:
            import openvino as ov

            ov_model = ov.convert_model(portable_model, input=[(-1, size, size, 3)])
            with atomic_path(path, suffix=".xml") as tmp:
                ov.save_model(ov_model, str(tmp))
                tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
    return path


@contextlib.contextmanager
def collecting_early():
    """A converter's discarded garbage freed as it goes, not at the end: the ONNX exporter (tf2onnx) copies
    the whole graph before each optimisation pass and drops the old copy as a reference cycle, which only a
    full garbage collection frees. CPython defers full collections while the long-lived objects (TensorFlow's,
    the model's) outnumber the new ones, so the copies pile up and set the conversion's peak memory.
    Everything alive now is frozen out of the collector's view, so that a full collection is cheap, and one
    runs every few young ones."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.collect()
    gc.set_threshold(threshold[0], 2, 2)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def convert_isolated(portable_model, path: Path, runtime: str) -> Path:
    """``convert`` in a child process, its output in ``<path>.log``: the converters' graph work would add
    its peak memory to the extracting process's and prints their chatter on every first run. The model goes
    across as a ``.keras`` file (built-in layers only, so it loads anywhere)."""
    import multiprocessing

    log_path = path.with_suffix(".log")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".convert-") as tmp:
        saved = Path(tmp) / "model.keras"
        portable_model.save(saved)
        child = multiprocessing.get_context("spawn").Process(
            target=_convert_child, args=(str(saved), str(path), runtime, str(log_path)), name="convert"
        )
        child.start()
        child.join()
    if child.exitcode != 0 or not path.exists():
        raise PipelineError(f"{last_line(log_path) or f'exit code {child.exitcode}'} (log: {log_path})")
    return path


CONVERT_HERE_BELOW = 1_000_000  # weights: below this, a second process costs more than the memory it saves


def converts_apart(portable_model) -> bool:
    """Whether a first conversion needs a process of its own: only a large model's memory is worth one."""
    return portable_model.count_params() >= CONVERT_HERE_BELOW


def convert_first(portable_model, path: Path, runtime: str) -> Path:
    """A model's first conversion, the converter's output in ``<path>.log``: a large model in a child
    process (``convert_isolated``), a small one in this process, where the converter's peak memory is
    small and a child would cost a TensorFlow import of its own."""
    if converts_apart(portable_model):
        return convert_isolated(portable_model, path, runtime)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _output_into(path.with_suffix(".log")):
        return convert(portable_model, path, runtime)


@contextlib.contextmanager
def _output_into(log_path: Path):
    """This process's output, the native libraries' included, and the converter's log records into
    ``log_path`` for the duration, as a converting child's would be."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    converter = logging.getLogger("tf2onnx")
    level, propagate = converter.level, converter.propagate
    with open(log_path, "w") as out:
        handler = logging.StreamHandler(out)
        converter.addHandler(handler)
        converter.setLevel(logging.INFO)
        converter.propagate = False
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                yield
        except BaseException:
            traceback.print_exc(file=out)  # the log says why, as a child's uncaught error would
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            converter.removeHandler(handler)
            converter.setLevel(level)
            converter.propagate = propagate


def convert_built(portable_model, outputs: dict, path: Path, runtime: str) -> None:
    """The model a converting child has just built, converted at ``path`` and ``outputs`` recorded beside it
    (last: the record says the conversion is complete). A large model is converted by a fresh interpreter
    (``exec_convert``): its build leaves memory behind that the converter's peak would add to. A small one
    is converted in this process: a second interpreter would cost a TensorFlow import to give back next
    to nothing."""
    if converts_apart(portable_model):
        exec_convert(portable_model, outputs, path, runtime)
    convert(portable_model, path, runtime)
    write_json_atomic(path.with_suffix(".outputs.json"), outputs)


def exec_convert(portable_model, outputs: dict, path: Path, runtime: str) -> None:
    """Become the converting process: ``portable_model`` and ``outputs`` (``write_outputs``' record) saved
    in a folder beside ``path``, then this process replaced by a fresh interpreter that converts them
    (``convert_saved``): the memory that building the model took is given back before the converter's
    graph work starts. Does not return."""
    folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=".convert-"))
    portable_model.save(folder / "model.keras")
    write_json_atomic(folder / "outputs.json", outputs)
    code = "import sys; from pipeline.extract.runtimes import convert_saved; convert_saved(*sys.argv[1:])"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", code, str(folder), str(path), runtime])


def convert_saved(folder: str, path: str, runtime: str) -> None:
    """What ``exec_convert`` runs: the saved model converted at ``path``, its outputs record moved beside it
    (last: the record says the conversion is complete), the folder removed."""
    import keras

    try:
        convert(keras.models.load_model(Path(folder) / "model.keras"), Path(path), runtime)
        os.replace(Path(folder) / "outputs.json", Path(path).with_suffix(".outputs.json"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def output_to(log_path: Path | str) -> None:
    """A converting child's output (the converters' chatter, its logs) into ``log_path`` instead of the
    terminal."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True)


def last_line(log_path: Path) -> str:
    """A converting child's last line of output: its error, when it failed."""
    lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
    return lines[-1] if lines else ""


def _convert_child(saved: str, path: str, runtime: str, log_path: str) -> None:
    output_to(log_path)
    import keras

    convert(keras.models.load_model(saved), Path(path), runtime)


def outputs_record(taps: list, dim: int) -> dict:
    """A converted model's taps (layer, shape, grid) and embedding width: what extraction needs to run it
    without building the Keras model again."""
    return {"taps": [[t.layer, list(t.shape), t.grid] for t in taps], "dim": dim}


def write_outputs(path: Path, taps: list, dim: int) -> None:
    """``outputs_record`` beside a converted model."""
    if path.exists():
        write_json_atomic(path.with_suffix(".outputs.json"), outputs_record(taps, dim))


def read_outputs(path: Path) -> dict | None:
    """What ``write_outputs`` recorded, when the converted model and the record both exist."""
    record = path.with_suffix(".outputs.json")
    if not (path.exists() and record.exists()):
        return None
    try:
        return json.loads(record.read_text())
    except (OSError, ValueError):
        return None


def onnx_session(model: Path | bytes, n_threads: int = 0, spinning: bool = True):
    """An ONNX Runtime CPU session: one batch's work split over ``n_threads`` (0: ORT's default, all
    cores), one operator at a time (inter-op parallelism buys nothing for a CNN). ``spinning=False``: idle
    intra-op threads sleep instead of busy-waiting for the next operator, which is what lets images be
    decoded on the same cores between and during batches; spinning threads take those cycles and starve
    the decoder, which then stalls every batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model if isinstance(model, bytes) else str(model), opts, providers=["CPUExecutionProvider"]
    )


def onnx_run(session) -> Forward:
    name = session.get_inputs()[0].name
    return lambda x: [np.asarray(o, np.float32) for o in session.run(None, {name: np.asarray(x, np.float32)})]


def onnx_forward(path: Path) -> Forward:
    """Extraction's session: a batch's convolutions split across every core, which the decoder shares."""
    return onnx_run(onnx_session(path, resources.cores(), spinning=False))


def openvino_forward(path: Path) -> Forward:
    import openvino as ov

    # float32 as in TensorFlow: on CPUs with bf16 units OpenVINO otherwise computes in bf16 (3e-3 relative off)
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    outputs = compiled.outputs
    return lambda x: [np.asarray(request.infer([np.asarray(x, np.float32)])[o], np.float32) for o in outputs]


def forward_for(runtime: str, model, build_portable: Callable, key: dict, folder: Path) -> tuple[Forward, str]:
    """(forward, the runtime actually used): ``model`` in TensorFlow, or its portable twin converted once
    for ONNX Runtime / OpenVINO; a conversion that fails falls back to TensorFlow with a notice."""
    size = int(model.input_shape[1])
    if runtime == "tf":
        return tf_forward(model, size), "tf"
    path = converted_path(folder, key, runtime)
    try:
        if not path.exists():
            convert_first(build_portable(), path, runtime)
            log.info("converted %s to %s (cached at %s)", key.get("backbone"), NAMES[runtime], path)
    except Exception as e:  # noqa: BLE001 - any exporter failure means: run it in TensorFlow instead
        log.warning(
            "notice: %s cannot be converted for %s (%s); running it in TensorFlow",
            key.get("backbone"),
            runtime,
            first_line(e)[:200],
        )
        return tf_forward(model, size), "tf"
    return (onnx_forward(path) if runtime == "onnx" else openvino_forward(path)), runtime
