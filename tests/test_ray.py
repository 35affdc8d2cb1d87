"""The Ray engine writes the same cache as the local one, resumes the same way, and says when Ray is missing."""

import sys

import h5py
import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache.key import read_key
from pipeline.extract.cache.writer import CacheWriter

pytestmark = pytest.mark.slow  # trains models, starts Ray or runs subprocesses: not in `make test-fast`


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _read(path):
    with h5py.File(path) as f:
        key = read_key(f.attrs)
        splits = {}
        for s in ("train", "val", "test"):
            g = f[s]
            taps = [g["taps"][n][()] for n in g["taps"]] if "taps" in g else []
            skipped = g["skipped"].asstr()[()].tolist()
            splits[s] = (g["ids"].asstr()[()], g["labels"][()], np.hstack([g["embeddings"][()], *taps]), skipped)
        return key, splits, bool(f.attrs["complete"])


def _local_reference(cfg, tmp_path):
    cfg.artifacts = str(tmp_path / "local")
    extract.run(cfg)
    ref = _read(extract.cache_path(cfg))
    cfg.artifacts = str(tmp_path / "ray")
    return ref


def _same(a, b):
    assert a[0] == b[0] and a[2] and b[2]  # same key, both complete
    for s in ("train", "val", "test"):
        ids_a, y_a, x_a, skipped_a = a[1][s]
        ids_b, y_b, x_b, skipped_b = b[1][s]
        assert list(ids_a) == list(ids_b) and (y_a == y_b).all() and skipped_a == skipped_b
        np.testing.assert_allclose(x_a, x_b, atol=1e-4)


@pytest.mark.parametrize(
    ("decoders", "says"),
    [(-1, "of 2 CPU(s), decoding in the actors"), (1, "of 1 CPU(s), 1 decode task(s)")],
    ids=["in-actor", "decode-stage"],
)
def test_ray_engine_writes_the_local_engines_cache(cfg, presplit, tmp_path, ray_cluster, caplog, decoders, says):
    """Both placements of decoding (in the model actors: the CPU default; a CPU stage: the GPU default)."""
    victim = next((presplit / "val" / "green").glob("*.png"))
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # unreadable: skipped, recorded
    ref = _local_reference(cfg, tmp_path)
    assert ref[1]["val"][3] == [victim.relative_to(presplit).as_posix()]
    cfg.extract.engine = "ray"
    cfg.extract.ray_decoders = decoders
    extract.run(cfg)
    assert f"ray engine: 36 items, 1 actor(s) {says}" in caplog.text
    _same(ref, _read(extract.cache_path(cfg)))


def test_an_interrupted_ray_run_resumes_to_the_same_result(cfg, tmp_path, ray_cluster, monkeypatch, caplog):
    ref = _local_reference(cfg, tmp_path)
    cfg.extract.engine = "ray"
    real, calls = CacheWriter.append, []

    def crash_after_two(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(CacheWriter, "append", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    monkeypatch.setattr(CacheWriter, "append", real)
    partial = extract.cache_path(cfg).with_name("tiny_cnn@16px.h5.partial")
    assert partial.exists() and not extract.cache_path(cfg).exists()
    extract.run(cfg)
    assert "resuming tiny_cnn@16px.h5.partial" in caplog.text
    _same(ref, _read(extract.cache_path(cfg)))


ACTOR = """
import sys
import numpy as np
from pipeline.extract.engines.ray_data import Embed, decode
embed = Embed(None, None, 1, 16, open({onnx!r}, "rb").read())
out = embed({{"k": np.arange({n}), "path": np.array({paths!r})}})
np.save({out!r}, np.hstack([out[f"out{{j}}"] for j in range(len(embed.widths))]))
print(out["ok"].tolist(), "tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_an_actor_on_the_converted_model_decodes_and_embeds_as_the_local_engine_without_tensorflow(
    cfg, presplit, tmp_path
):
    """What each Ray actor runs when the model is converted (the CPU default), in a process of its own."""
    import subprocess

    from pipeline.extract import runtimes

    key, splits, _ = _local_reference(cfg, tmp_path)
    onnx = runtimes.converted_path(
        runtimes.store(tmp_path / "local", cfg.extract.runtimes_dir), runtimes.model_key(key), "onnx"
    )
    ids, _, ref, _ = splits["test"]
    paths = [str(presplit / i) for i in ids] + [str(tmp_path / "broken.png")]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    code = ACTOR.format(onnx=str(onnx), n=len(paths), paths=paths, out=str(tmp_path / "out.npy"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split()[-1] == "False"  # tensorflow imported: False
    assert run.stdout.startswith(str([True] * len(ids) + [False]))  # the unreadable file flagged, not dropped
    np.testing.assert_allclose(np.load(tmp_path / "out.npy")[: len(ids)], ref, atol=1e-5)


def test_without_ray_the_engine_is_a_one_line_error(cfg, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    cfg.extract.engine = "ray"
    with pytest.raises(PipelineError) as err:
        extract.run(cfg)
    assert "\n" not in str(err.value) and "pip install -e '.[ray]'" in str(err.value)
    assert not extract.cache_path(cfg).parent.exists()  # refused before any work


@pytest.mark.parametrize(
    ("nodes", "actors", "decoders", "expected"),
    [
        ([{"CPU": 2.0}], 0, -1, (1, 2.0, 2, 0, 0)),  # this machine: one actor with both cores, decoding itself
        ([{"CPU": 8.0}, {"CPU": 8.0}], 0, -1, (2, 8.0, 8, 0, 0)),  # one actor per node, never a node's more
        ([{"CPU": 2.0}, {"CPU": 2.0}], 4, -1, (4, 1.0, 1, 0, 0)),  # --ray-actors 4 share the cores
        ([{"CPU": 2.0}], 0, 1, (1, 1.0, 1, 1, 0)),  # a decode stage leaves the actor a core less
        ([{"CPU": 16.0, "GPU": 2.0}], 0, -1, (2, 0, 0, 14, 2)),  # one actor per GPU, the cores decode
    ],
)
def test_the_pool_fits_the_cluster(nodes, actors, decoders, expected):
    from pipeline.config import ExtractConfig
    from pipeline.extract.engines.ray_data import plan_pool

    plan = plan_pool(nodes, ExtractConfig(ray_actors=actors, ray_decoders=decoders))
    assert (plan.actors, plan.actor_cpus, plan.threads, plan.decoders, plan.gpus) == expected
