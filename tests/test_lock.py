"""Two extractions of one cache at once: one writes, the other waits and then finds it done.

Event-driven, no polling deadline: the first extraction holds the cache's lock and does not start writing
until the second has said it is waiting (``flock`` locks conflict between two opens of the file even in
one process, so two threads show what two terminals would)."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline import lock
from pipeline.extract import stage as extract
from pipeline.extract.cache.reader import load_features

HANG_GUARD = 300  # seconds: only a broken lock gets near it; the test never waits on time otherwise

pytestmark = pytest.mark.slow  # runs the extraction, a converter or a second process: not in `make test-fast`


class _Said(logging.Handler):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.event = prefix, threading.Event()

    def emit(self, record):
        if record.getMessage().startswith(self.prefix):
            self.event.set()


def test_a_second_extraction_of_the_same_cache_waits_and_nothing_is_lost(cfg, monkeypatch):
    waiting = _Said("waiting: tiny_cnn@16px.h5 is being written by pid")
    logging.getLogger("pipeline.lock").addHandler(waiting)
    holding = threading.Event()
    real = extract._extract

    def first_writer(*a, **k):  # runs under the lock: hold it until the second run waits for it
        holding.set()
        assert waiting.event.wait(HANG_GUARD), "the second extraction did not wait for the lock"
        return real(*a, **k)

    monkeypatch.setattr(extract, "_extract", first_writer)
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(extract.run, cfg)
            assert holding.wait(HANG_GUARD)
            second = pool.submit(extract.run, cfg)
            a, b = first.result(HANG_GUARD), second.result(HANG_GUARD)
    finally:
        logging.getLogger("pipeline.lock").removeHandler(waiting)
    assert (a.cache_hit, b.cache_hit) == (False, True)  # one wrote the cache, the other waited and reused it
    fs = load_features(a.path)
    for s, n in (("train", 18), ("val", 9), ("test", 9)):
        ids = fs.splits[s].ids
        assert len(ids) == n and len(set(ids)) == n and np.isfinite(fs.splits[s].X).all()
    assert not a.path.with_name(a.path.name + ".partial").exists()


def test_the_lock_is_exclusive_and_released_on_exit(tmp_path):
    target = tmp_path / "table.csv"
    order = []
    waiting = _Said("waiting: table.csv")
    logging.getLogger("pipeline.lock").addHandler(waiting)
    try:

        def second():
            with lock.exclusive(target):
                order.append("second in")

        with lock.exclusive(target):
            t = threading.Thread(target=second)
            t.start()
            assert waiting.event.wait(HANG_GUARD)
            order.append("first out")
        t.join(HANG_GUARD)
    finally:
        logging.getLogger("pipeline.lock").removeHandler(waiting)
    assert order == ["first out", "second in"]
