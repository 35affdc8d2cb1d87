import h5py
import numpy as np
import pytest
from conftest import TINY

from pipeline import backbones
from pipeline.artifacts import sha256_file
from pipeline.errors import PipelineError
from pipeline.extract import stage as extract
from pipeline.extract.cache.writer import CacheWriter

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


def _read(path):
    with h5py.File(path, "r") as f:
        out = {
            s: {k: f[s][k][()] for k in ("embeddings", "labels", "ids", "skipped")} for s in ("train", "val", "test")
        }
        return out, dict(f.attrs)


def test_extract_writes_the_documented_layout(cfg):
    res = extract.run(cfg)
    assert not res.cache_hit and res.path.name == f"{TINY}@16px.h5"
    data, attrs = _read(res.path)
    assert [data[s]["embeddings"].shape for s in ("train", "val", "test")] == [(18, 16), (9, 16), (9, 16)]
    emb = data["train"]["embeddings"]
    assert emb.dtype == np.float32 and np.isfinite(emb).all() and emb.std(axis=0).max() > 0
    assert data["test"]["ids"][0].decode() == "test/blue/blue_000.png"
    assert data["train"]["labels"].tolist() == sorted(data["train"]["labels"].tolist())
    assert attrs["backbone"] == TINY and attrs["input_size"] == 16 and attrs["preprocessing"] == "x / 255"
    assert "random" in attrs["weights"] and "tests only" in attrs["weights"]
    assert attrs["class_names"] == '["blue", "green", "red"]' and attrs["complete"]
    assert len(attrs["dataset_fingerprint"]) == 64
    assert not res.path.with_name(res.path.name + ".partial").exists()
    assert res.path.with_suffix(".json").exists()


def test_second_run_is_a_cache_hit_without_forward_pass(cfg, monkeypatch):
    first = extract.run(cfg)
    monkeypatch.setattr(backbones, "build_backbone", lambda *a, **k: pytest.fail("built a model on a cache hit"))
    second = extract.run(cfg)
    assert second.cache_hit and second.path == first.path


def test_changed_file_list_or_preprocessing_invalidates_the_cache(cfg, presplit, caplog, monkeypatch):
    first = extract.run(cfg)
    (presplit / "test" / "red" / "red_000.png").unlink()
    second = extract.run(cfg)
    assert not second.cache_hit and "dataset_fingerprint changed" in caplog.text
    assert _read(second.path)[0]["test"]["embeddings"].shape[0] == 8

    spec = backbones.get(TINY)
    monkeypatch.setitem(
        backbones.REGISTRY, TINY, backbones.BackboneSpec(TINY, 16, "x / 127.5 - 1", "unit", spec.build, "test")
    )
    third = extract.run(cfg)
    assert not third.cache_hit and "preprocessing changed" in caplog.text
    assert first.path == third.path


def test_interrupted_extraction_resumes_to_the_same_cache(cfg, tmp_path, monkeypatch):
    reference = _read(extract.run(cfg).path)[0]
    cfg.artifacts = str(tmp_path / "other")
    real = CacheWriter.append
    calls = {"n": 0}

    def crash_after_three(*a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        real(*a, **k)

    monkeypatch.setattr(CacheWriter, "append", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        extract.run(cfg)
    partial = extract.cache_path(cfg).with_name(f"{TINY}@16px.h5.partial")
    assert partial.exists() and not extract.cache_path(cfg).exists()
    with h5py.File(partial) as f:
        assert f["train"].attrs["rows"] == 12  # three batches of four

    monkeypatch.setattr(
        CacheWriter,
        "append",
        lambda *a, **k: (calls.__setitem__("resumed", calls.get("resumed", 0) + 1), real(*a, **k)),
    )
    resumed = extract.run(cfg)
    assert calls["resumed"] == 2 + 3 + 3  # the 24 images left: 6 batches, 2 straddling a split boundary
    got = _read(resumed.path)[0]
    for s in ("train", "val", "test"):
        assert got[s]["ids"].tolist() == reference[s]["ids"].tolist()
        np.testing.assert_allclose(got[s]["embeddings"], reference[s]["embeddings"], rtol=1e-5, atol=1e-6)


def test_the_writer_writes_a_chunk_at_a_time_and_a_killed_run_resumes_from_the_last_chunk(tmp_path):
    """Batches are held until a storage chunk's worth has come, then written with their resume point: a run
    killed without closing (no ``abort``) keeps every written chunk and nothing past it; ``abort`` (an
    interrupt, an error) writes what it holds."""
    out = tmp_path / "c.h5"

    def batch(k):
        ids = [f"train/x/{k * 4 + i}.png" for i in range(4)]
        return np.full((4, 3), k, np.float32), np.zeros(4, np.int64), ids, (k + 1) * 4

    w = CacheWriter(out, {"backbone": "b"}, 3, [], ("train",), chunk_rows=8)
    w.append("train", *batch(0))
    w.add_seconds(1.0)
    assert w.f["train"]["embeddings"].shape[0] == 0 and w.next_index("train") == 0  # held, resume point kept
    w.append("train", *batch(1))
    w.add_seconds(1.0)
    w.append("train", *batch(2))
    assert w.f["train"]["embeddings"].shape[0] == 8 and w.next_index("train") == 8  # one chunk, then its point
    w.f.close()  # killed: batch 2 was held, never written

    w = CacheWriter(out, {"backbone": "b"}, 3, [], ("train",), chunk_rows=8)
    assert w.next_index("train") == 8 and w.rows_written() == 8
    w.append("train", *batch(2))
    w.abort()  # an interrupt: the held batch is written before the file is closed
    with h5py.File(out.with_name(out.name + ".partial")) as f:
        assert f["train"].attrs["rows"] == 12 and f["train"].attrs["next_index"] == 12
        assert f["train"]["embeddings"][:, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_corrupt_image_is_skipped_and_recorded_or_fails_with_strict(cfg, presplit, caplog):
    victim = presplit / "val" / "green" / "green_001.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated mid-stream
    (presplit / "train" / "red" / "red_002.png").write_text("this is text")
    res = extract.run(cfg)
    data, _ = _read(res.path)
    assert res.skipped == {"train": ["train/red/red_002.png"], "val": ["val/green/green_001.png"], "test": []}
    assert [x.decode() for x in data["val"]["skipped"]] == ["val/green/green_001.png"]
    assert b"val/green/green_001.png" not in data["val"]["ids"].tolist()
    assert data["val"]["embeddings"].shape[0] == 8
    assert "skipped 1 unreadable file(s) in val: val/green/green_001.png" in caplog.text

    cfg.extract.strict = True
    cfg.artifacts = cfg.artifacts + "-strict"
    with pytest.raises(PipelineError, match="unreadable image train/red/red_002.png"):
        extract.run(cfg)


def test_weights_from_a_file_are_hashed_into_the_cache(cfg, tmp_path):
    spec = backbones.get(TINY)
    model = spec.build(None, 16)
    path = tmp_path / "tiny.weights.h5"
    model.save_weights(path)
    cfg.backbone.weights = str(path)
    res = extract.run(cfg)
    _, attrs = _read(res.path)
    assert attrs["weights"] == "file (tiny.weights.h5)"
    assert attrs["weights_sha256"] == sha256_file(path)
