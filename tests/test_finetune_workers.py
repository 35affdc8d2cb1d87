"""`finetune --engine ray --workers 2` on a local Ray cluster: two worker processes train data-parallel under
MultiWorkerMirroredStrategy, the chief alone writes one model and one row, and an interrupted run resumes
from the chief's checkpoint. The tiny backbone goes as a model file, which every Ray process can load."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.finetune import workers
from pipeline.finetune.record import SearchRecord

pytest.importorskip("ray")

FLAGS = ["--epochs-head", "1", "--lr-grid", "0.001", "0.01", "--batch-size", "4", "--augment", "flip"]

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the module, which each run joins through ``RAY_ADDRESS`` as it would join a
    user's cluster (rather than starting and stopping one of its own)."""
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    ray.shutdown()


@pytest.fixture
def setup(tmp_path):
    from conftest import _build_tiny, write_images

    data = tmp_path / "data" / "toy"
    for k, (split, n) in enumerate((("train", 9), ("val", 5), ("test", 3))):
        write_images(data / split, n, seed=k)
    import keras

    model, tiny = tmp_path / "tiny.keras", _build_tiny(None, 16)
    # seeded kernels: drawn from Keras' global generator they depended on the tests this worker ran before
    # (and the one-device run could saturate, leaving no difference to show)
    weights = tiny.get_weights()
    tiny.set_weights(
        [keras.initializers.GlorotUniform(seed=i)(w.shape) if w.ndim > 1 else w for i, w in enumerate(weights)]
    )
    tiny.save(model)
    return data, tmp_path / "artifacts", model


def _command(data, artifacts, model, *extra):
    return [sys.executable, "-m", "pipeline", "finetune", "--dataset", str(data), "--artifacts", str(artifacts)] + [
        "--backbone",
        str(model),
        "--engine",
        "ray",
        "--workers",
        "2",
        *FLAGS,
        *extra,
    ]


def _rows(artifacts: Path):
    import pandas as pd

    return pd.read_csv(artifacts / "results" / "toy.csv")


def test_two_workers_train_like_one_device_at_the_same_global_batch(setup, cluster, tmp_path):
    """The equivalence the strategy promises: one device with 24 images a step against two workers with 12
    each, every step a whole epoch (so neither shuffle nor shard order matters), no augmentation or dropout;
    the same validation accuracy within 1 of 15 images and the same test predictions on 9 of 9 or 8 of 9
    (all-reduced halves sum in another float order, which Adam can turn into different small steps)."""
    import pandas as pd
    from conftest import write_images

    data, _, model = setup
    shutil.rmtree(data / "train")
    write_images(data / "train", 8, seed=0)  # 24 training images: a step is an epoch
    toml = tmp_path / "plain.toml"
    toml.write_text("[finetune]\naugment = []\n")
    same = ["--config", str(toml), "--dropout", "0", "--epochs-finetune", "3", "--patience", "3"]
    same += ["--learning-rate", "0.003", "--lr-grid", "0.003", "--schedule", "constant"]
    out = {}
    for name, extra in (("one", ["--engine", "local", "--batch-size", "24"]), ("two", ["--batch-size", "12"])):
        artifacts = tmp_path / name
        command = [a for a in _command(data, artifacts, model, *same, *extra) if a not in ("--augment", "flip")]
        run = subprocess.run(command, capture_output=True, text=True, env=cluster)
        assert run.returncode == 0, run.stderr[-3000:]
        row = _rows(artifacts).set_index("method").loc["finetune"]
        preds = pd.read_csv(artifacts / "models" / "toy" / "tiny-finetuned.predictions.csv")["y_pred"]
        out[name] = (row["val_accuracy"], json.loads(row["params"])["devices"]["global_batch"], preds)
    assert out["one"][1] == out["two"][1] == 24
    assert out["one"][0] < 0.95  # not saturated: a difference could show
    assert abs(out["one"][0] - out["two"][0]) <= 1 / 15 + 1e-9
    assert (out["one"][2] == out["two"][2]).sum() >= len(out["one"][2]) - 1


def test_an_interrupted_two_worker_run_resumes_from_the_chiefs_checkpoint_to_one_model_and_one_row(setup, cluster):
    """Cut short after phase 1, then resumed: the search (two rates, augmented) and phase 2 run on two workers,
    and the chief alone writes one model and one row, every worker's folder removed."""
    data, artifacts, model = setup
    models = artifacts / "models" / "toy"
    work = models / "tiny-finetuned.work"
    long = ("--epochs-finetune", "3", "--patience", "3")  # a phase 2 to interrupt
    first = subprocess.Popen(
        _command(data, artifacts, model, *long),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cluster,
    )
    deadline = time.monotonic() + 300
    while not (work / "phase1.done.weights.h5").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert not (models / "tiny-finetuned.json").exists()  # it really was cut short
    phase_one = json.loads((work / "state.json").read_text())["phase_seconds"][0]

    second = subprocess.run(
        _command(data, artifacts, model, *long, "--resume"), capture_output=True, text=True, env=cluster
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "phase 1 already done" in second.stdout + second.stderr
    record = json.loads((models / "tiny-finetuned.json").read_text())
    assert record["phase_seconds"][0] == phase_one  # phase 1 not trained again: taken up from the checkpoint
    rows = _rows(artifacts)
    assert sorted(rows["method"]) == ["finetune", "frozen_dense"]
    params = json.loads(rows.set_index("method").loc["finetune", "params"])
    assert params["devices"] == {
        "replicas": 2,
        "strategy": "MultiWorkerMirroredStrategy over 2 Ray workers",
        "global_batch": 8,
        "workers": 2,
    }
    # searched on the workers too (a clear lead on the grid's edge may add the next rate beyond it)
    assert {"0.001", "0.01"} <= set(SearchRecord.from_params(params).rungs[0])
    assert (models / "tiny-finetuned.keras").exists()
    assert sorted(p.name for p in models.iterdir() if "work" in p.name) == []  # every worker's folder removed


def test_the_other_workers_start_from_a_copy_of_the_chiefs_folder(tmp_path):
    work = tmp_path / "m.work"
    work.mkdir()
    (work / "state.json").write_text("{}")
    (work / "train.decoded.npy").write_bytes(b"x")
    stale = workers.worker_dir(work, 1)
    stale.mkdir()
    (stale / "old").write_text("")
    workers.prepare_folders(work, 3, resume=True)
    for index in (1, 2):
        assert sorted(p.name for p in workers.worker_dir(work, index).iterdir()) == ["state.json"]
    workers.prepare_folders(work, 3, resume=False)
    assert not workers.worker_dir(work, 1).exists() and (work / "state.json").exists()
    assert json.loads(workers.tf_config(["a:1", "b:2"], 1)) == {
        "cluster": {"worker": ["a:1", "b:2"]},
        "task": {"type": "worker", "index": 1},
    }
    assert os.path.basename(workers.worker_dir(work, 0)) == "m.work"
