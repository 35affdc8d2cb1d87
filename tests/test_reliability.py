"""Faults and races tried on purpose: concurrent writers, edited tables, full disks, signals, corrupt caches."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import results
from pipeline.errors import PipelineError

_UPSERTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline import results
    path, who, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    for i in range(200):
        results.upsert(path, {"dataset": "d", "backbone": who, "method": "ridge", "features": "image",
                              "n_train": i, "test_accuracy": 0.5})
    """
)

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


def test_concurrent_upserts_lose_no_row(tmp_path):
    """Two processes adding 200 distinct rows each to one table at the same time: all 400 are there."""
    path, go = tmp_path / "results" / "d.csv", tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", _UPSERTER, str(path), who, str(go)], stderr=subprocess.PIPE)
        for who in ("a", "b")
    ]
    time.sleep(1.0)  # both interpreters up and waiting
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    table = results.read_results(path)
    assert len(table) == 400
    assert sorted(table.groupby("backbone").size().tolist()) == [200, 200]
    assert not list(path.parent.glob("*.tmp*"))


def test_invalid_results_table_is_named_with_its_line(tmp_path):
    path = tmp_path / "d.csv"
    results.upsert(path, {"dataset": "d", "backbone": "b", "method": "ridge", "features": "image", "n_train": 1})
    results.upsert(path, {"dataset": "d", "backbone": "b", "method": "logreg", "features": "image", "n_train": 1})
    lines = path.read_text().splitlines()
    lines[2] += ",one,field,too,many"
    path.write_text("\n".join(lines) + "\n")
    before = path.read_bytes()
    with pytest.raises(PipelineError, match=r"d\.csv is not a valid results table: .*line 3"):
        results.upsert(path, {"dataset": "d", "backbone": "b", "method": "knn", "features": "image", "n_train": 1})
    assert path.read_bytes() == before  # named, never rewritten


def test_results_row_without_key_is_named(tmp_path):
    path = tmp_path / "d.csv"
    row = {"dataset": "d", "backbone": "b", "method": "ridge", "features": "image", "n_train": 1}
    pd.DataFrame([row, {**row, "method": None}]).to_csv(path, index=False)
    with pytest.raises(PipelineError, match="line 3 has no dataset/backbone/method"):
        results.read_results(path)


def test_a_results_table_from_before_seeds_and_layers_is_read_and_kept(tmp_path):
    """Tables written before the ``layers`` and ``seed`` key columns existed: read, updated in place, no row lost;
    a row's extra seed is a row of its own beside the configured seed's."""
    path = tmp_path / "d.csv"
    old = {"dataset": "d", "backbone": "b", "method": "finetune", "features": "image", "n_train": 30}
    pd.DataFrame([old, {**old, "method": "ridge"}]).to_csv(path, index=False)
    table = results.read_results(path)
    assert table["layers"].tolist() == ["last", "last"] and table["seed"].isna().all()
    results.upsert(path, {**old, "test_accuracy": 0.5})  # the same key: replaces the old finetune row
    results.upsert(path, {**old, "seed": 1, "test_accuracy": 0.6})  # an extra seed: a row of its own
    table = results.read_results(path)
    assert sorted(zip(table["method"], table["seed"].fillna(-1))) == [("finetune", -1), ("finetune", 1), ("ridge", -1)]


def _head_outputs(cfg, fs, order):
    """Every default head on layer sets last and all, in ``order``: (val accuracy, val and test predictions)."""
    import joblib

    from pipeline import heads

    cfg.heads.heads = tuple(order)
    out = {}
    for r in heads.run(cfg, load=lambda: fs):
        name = results.head_name(r.head, r.features, r.layers)
        model = joblib.load(Path(cfg.artifacts) / "heads" / "toy" / "tiny_cnn@16px" / f"{name}.joblib")
        val = fs.with_layers(r.layer_names).splits["val"].X
        out[name] = (r.val_accuracy, model.predict(val).tolist(), r.test_pred.tolist())
    return out


def test_heads_leave_the_shared_arrays_bit_identical_and_do_not_depend_on_their_order(cfg, tmp_path):
    """The scalers used to be applied to the shared float32 arrays and undone after (not the identity)."""
    import shutil

    from pipeline.config import HeadsConfig
    from pipeline.extract import stage as extract
    from pipeline.extract.cache.reader import load_features

    cfg.heads.layers = ("last", "all")
    path = extract.run(cfg).path
    fs = load_features(path)
    before = {s: a.copy() for s, a in fs.packed.items()}
    forward = _head_outputs(cfg, fs, HeadsConfig().heads)
    for s, a in fs.packed.items():
        assert np.array_equal(a, before[s]), f"{s} features changed by fitting the heads"
    second = tmp_path / "second"
    shutil.copytree(path.parent, second / "features" / "toy")
    cfg.artifacts = str(second)
    backward = _head_outputs(cfg, load_features(path), reversed(HeadsConfig().heads))
    assert len(forward) == 8 and forward == backward


def test_augmentation_layers_draw_from_independent_seeds():
    from pipeline.finetune import augmentation_layers

    layers = augmentation_layers(("flip", "zoom", "translate"), 0)
    seeds = [layer.seed for layer in layers]
    assert len(set(seeds)) == 3
    assert seeds == [layer.seed for layer in augmentation_layers(("flip", "zoom", "translate"), 0)]
    assert seeds != [layer.seed for layer in augmentation_layers(("flip", "zoom", "translate"), 1)]


def test_a_cache_of_another_precision_is_reextracted_with_the_reason(cfg, caplog):
    import h5py

    from pipeline.extract import stage as extract

    first = extract.run(cfg)
    with h5py.File(first.path, "r") as f:
        assert f.attrs["precision"] == "float32 (CPU)"
    with h5py.File(first.path, "a") as f:  # as a GPU run under mixed precision would have written it
        f.attrs["precision"] = "mixed_float16 (GPU)"
        f.attrs["device"] = "GPU"
    second = extract.run(cfg)
    assert not second.cache_hit
    assert "precision changed: mixed_float16 (GPU) -> float32 (CPU)" in caplog.text
    with h5py.File(second.path, "a") as f:  # a cache from before precision was keyed: its device settles it
        del f.attrs["precision"]
    assert extract.run(cfg).cache_hit


def _cache_arrays(path):
    import h5py

    with h5py.File(path, "r") as f:
        return {
            s: (f[s]["ids"].asstr()[()].tolist(), f[s]["embeddings"][()], [f[s]["taps"][n][()] for n in f[s]["taps"]])
            for s in ("train", "val", "test")
        }


def _same_cache(a, b):
    for s in ("train", "val", "test"):
        assert a[s][0] == b[s][0]
        np.testing.assert_allclose(a[s][1], b[s][1], rtol=1e-5, atol=1e-6)
        for x, y in zip(a[s][2], b[s][2], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_disk_filling_up_mid_extraction_stops_in_one_line_and_resumes(cfg, tmp_path, monkeypatch):
    """The free space runs out after three batches: a one-line error naming the disk and the space the rest
    needs, the partial file whole (three batches), and a rerun resumes to the uninterrupted cache."""
    import shutil

    from pipeline.extract import stage as extract
    from pipeline.extract.cache import writer

    real_usage = shutil.disk_usage

    reference = _cache_arrays(extract.run(cfg).path)
    cfg.artifacts = str(tmp_path / "full")
    calls = {"n": 0}

    def filling_disk(path):
        calls["n"] += 1
        usage = real_usage(path)
        return usage._replace(free=usage.free if calls["n"] <= 3 else 1000)

    monkeypatch.setattr(writer.shutil, "disk_usage", filling_disk)
    with pytest.raises(PipelineError) as e:
        extract.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"disk full writing {extract.cache_path(cfg)}.partial")
    assert "MiB free on the disk of" in msg and "the remaining 24 images need ~" in msg
    assert "the 12 rows written are kept; free space and rerun the same command to resume" in msg
    monkeypatch.undo()
    resumed = extract.run(cfg)
    assert not resumed.cache_hit
    _same_cache(_cache_arrays(resumed.path), reference)


_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers the tiny backbone
    from pipeline.cli import main
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    sys.exit(main(sys.argv[3:]))
    """
)


def test_a_real_file_size_limit_fails_cleanly_and_the_rerun_completes(cfg, tmp_path, presplit):
    """RLIMIT_FSIZE makes the kernel refuse the cache's growth as a full disk would: one error line, no
    traceback, and the rerun without the limit ends with the same cache as an uninterrupted run."""
    from pathlib import Path

    from pipeline.extract import stage as extract

    reference = extract.run(cfg)
    limit = reference.path.stat().st_size // 2
    argv = ["extract", "--dataset", str(presplit), "--backbone", "tiny_cnn", "--weights", "none"]
    argv += ["--batch-size", "4", "--artifacts", str(tmp_path / "limited")]
    tests = str(Path(__file__).parent)
    run = subprocess.run([sys.executable, "-c", _LIMITED, tests, str(limit), *argv], capture_output=True, text=True)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and len(errors) == 1 and "disk full writing" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "the file-size limit (ulimit -f) is" in errors[0]

    cfg.artifacts = str(tmp_path / "limited")
    _same_cache(_cache_arrays(extract.run(cfg).path), _cache_arrays(reference.path))


def test_a_truncated_cache_is_named_with_the_rebuild_command_and_extract_rebuilds_it(cfg, caplog, capsys):
    from pipeline import heads
    from pipeline.cli import main
    from pipeline.extract import stage as extract

    path = extract.run(cfg).path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match=rf"{path} is not a readable HDF5 cache .*rerun `make extract`"):
        heads.run(cfg)
    rebuilt = extract.run(cfg)
    assert not rebuilt.cache_hit and f"cache {path} is unreadable" in caplog.text and "rebuilding it" in caplog.text
    assert len(heads.run(cfg)) > 0
    corrupt = bytearray(path.read_bytes())  # a complete file whose data blocks were overwritten
    corrupt[len(corrupt) // 3 :] = bytes(len(corrupt) - len(corrupt) // 3)
    path.write_bytes(bytes(corrupt))
    argv = ["heads", "--dataset", cfg.data.dataset, "--backbone", "tiny_cnn", "--artifacts", cfg.artifacts]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0] and "`make extract`" in errors[0], errors


_KILLED_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    import conftest  # registers the tiny backbone
    import joblib
    from pipeline import heads
    from pipeline.cli import main
    calls = {"n": 0}
    def dump_then_die(obj, path):
        calls["n"] += 1
        joblib.dump(obj, path)
        if calls["n"] == 3:  # the third model: half written to its temporary file when SIGTERM arrives
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGTERM)
    heads.stage.joblib = type("J", (), {"dump": staticmethod(dump_then_die), "load": joblib.load})
    sys.exit(main(sys.argv[2:]))
    """
)


def test_sigterm_during_heads_leaves_no_half_written_artifact_and_a_rerun_finishes(cfg, caplog):
    """Every sidecar left vouches for a complete model (the sidecar is removed before a model is rewritten
    and written after it); temporary files are removed on the way out; the rerun fits only what is missing."""
    from pathlib import Path

    import joblib

    from pipeline import heads
    from pipeline.extract import stage as extract

    extract.run(cfg)
    argv = ["heads", "--dataset", cfg.data.dataset, "--backbone", "tiny_cnn", "--artifacts", cfg.artifacts]
    run = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_WRITE, str(Path(__file__).parent), *argv], capture_output=True, text=True
    )
    assert run.returncode == 143, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith("terminated; nothing half-written was kept")
    out = Path(cfg.artifacts) / "heads" / "toy" / "tiny_cnn@16px"
    assert not list(out.glob("*.tmp*"))
    sidecars = sorted(out.glob("*.json"))
    models = [p.with_suffix(".joblib") for p in sidecars if p.name != "layers.json"]
    assert len(models) == 2  # the two finished heads; the third has no sidecar
    for m in models:
        assert hasattr(joblib.load(m), "predict")
    rerun = heads.run(cfg)
    assert len(rerun) == 8 and caplog.text.count("up to date") == 2
    table = results.read_results(results.results_path(cfg.artifacts, "toy"))
    assert len(table) == 8


def test_a_full_disk_while_saving_a_head_keeps_the_previous_result_whole(cfg, monkeypatch, capsys):
    import errno
    from pathlib import Path

    from pipeline.cli import main
    from pipeline.extract import stage as extract

    extract.run(cfg)
    argv = ["heads", "--dataset", cfg.data.dataset, "--backbone", "tiny_cnn", "--artifacts", cfg.artifacts]
    argv += ["--heads", "ridge", "--layers", "last"]
    assert main(argv) == 0
    art = Path(cfg.artifacts)
    before = {p: p.read_bytes() for p in art.rglob("*") if p.is_file() and "heads" in p.parts or p.suffix == ".csv"}
    real = results.write_predictions

    def full_disk(path, *a, **k):
        real(path, *a, **k)  # the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(results, "write_predictions", full_disk)
    assert main([*argv, "--alpha-grid", "1e6"]) == 2  # another model than the saved one
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "no space left writing" in err[0] and "free on the disk of" in err[0], err
    after = {p: p.read_bytes() for p in art.rglob("*") if p.is_file() and "heads" in p.parts or p.suffix == ".csv"}
    after.pop(art / "heads" / "toy" / "tiny_cnn@16px" / "layers.json")  # per-layer scores, rewritten whole each run
    before.pop(art / "heads" / "toy" / "tiny_cnn@16px" / "layers.json")
    assert after == before  # model, predictions, sidecar and the results table as they were; no temporary files


def test_the_fine_tune_key_has_the_precision_too(cfg, monkeypatch):
    """A fine-tune trained on a GPU under mixed precision is not reused for a CPU float32 run."""
    from pathlib import Path

    from pipeline import backbones, finetune
    from pipeline.data import from_config

    ds = from_config(cfg)
    spec = backbones.from_config(cfg.backbone)
    weights = backbones.resolve_weights(spec, cfg.backbone.weights, Path(cfg.artifacts), spec.input_size)
    cpu = finetune.train._inputs_key(cfg, ds, spec, weights, spec.input_size)
    monkeypatch.setattr(backbones.device, "gpu_visible", lambda: True)
    gpu = finetune.train._inputs_key(cfg, ds, spec, weights, spec.input_size)
    cfg.backbone.mixed_precision = False
    gpu32 = finetune.train._inputs_key(cfg, ds, spec, weights, spec.input_size)
    assert len({cpu, gpu, gpu32}) == 3
