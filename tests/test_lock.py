"""Two extractions of one cache at once: one writes, the other waits and then finds it done."""

import subprocess
import sys
import time
from pathlib import Path

import h5py

from pipeline import extract, lock

CHILD = """
import sys, logging
sys.path.insert(0, {tests!r})
import conftest  # registers the tiny backbone
from pipeline import extract
from pipeline.config import Config
logging.basicConfig(level=logging.INFO, format="%(message)s")
cfg = Config()
cfg.artifacts, cfg.data.dataset = {artifacts!r}, {dataset!r}
cfg.backbone.backbone, cfg.backbone.weights, cfg.extract.batch_size = "tiny_cnn", "none", 4
r = extract.run(cfg)
print("HIT" if r.cache_hit else "WROTE", r.n_images)
"""


def test_a_second_extraction_of_the_same_cache_waits_and_nothing_is_lost(cfg, tmp_path):
    out = extract.cache_path(cfg)
    script = CHILD.format(tests=str(Path(__file__).parent), artifacts=cfg.artifacts, dataset=cfg.data.dataset)
    logs = [tmp_path / f"child{k}.log" for k in range(2)]
    with lock.exclusive(out):  # both children start while the cache is held, so they must overlap
        kids = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=open(p, "w"), text=True)
            for p in logs
        ]
        deadline = time.time() + 180
        while time.time() < deadline and not all("waiting" in p.read_text() for p in logs):
            time.sleep(0.2)
    results = [(k.communicate(timeout=300)[0], p.read_text()) for k, p in zip(kids, logs)]
    assert [k.returncode for k in kids] == [0, 0], [e[-2000:] for _, e in results]
    outs = sorted(o.split()[-2] for o, _ in results)
    assert outs == ["HIT", "WROTE"]  # one wrote the cache, the other waited and reused it
    assert all("waiting: tiny_cnn.h5 is being written by pid" in e for _, e in results)
    with h5py.File(out) as f:
        assert f.attrs["complete"]
        for s, n in (("train", 18), ("val", 9), ("test", 9)):
            ids = f[s]["ids"].asstr()[()]
            assert len(ids) == n and len(set(ids)) == n
    assert not out.with_name(out.name + ".partial").exists()
