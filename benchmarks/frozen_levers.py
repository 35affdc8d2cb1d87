"""Frozen-side levers measured through the real `heads` stage: test-time flip averaging of embeddings and
two backbones' embeddings side by side, each as a cache in extract's layout that `heads` then tunes and
scores exactly as it does any cache (same grids, same val split, same rows).

    # a mirrored copy of a prepared dataset (same ids, every image flipped left-right)
    python benchmarks/frozen_levers.py flip data/full/fashion-mnist data/full-flip/fashion-mnist
    # extract both (`extract --data-root …`), then one cache of their mean (flip averaging) or their
    # concatenation (two backbones), written where `heads --artifacts OUT` finds it:
    python benchmarks/frozen_levers.py combine --how mean A.h5 B.h5 --artifacts OUT --dataset fashion-mnist
    python -m pipeline heads --artifacts OUT --dataset fashion-mnist …

A combined cache is charged both extractions (its `extract_seconds` is their sum). Its rows are filed
under the first cache's backbone; the artifacts folder says what it holds. Flip averaging is applied to
every split (train too), so the heads see the same kind of embedding they are scored on.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data import SPLITS  # noqa: E402

ROWS = 4096  # rows combined at a time: two caches are never held whole in memory


def flip(src: Path, dst: Path) -> None:
    """Every image of ``src`` mirrored left-right into ``dst`` under the same relative path (so the same id)."""
    files = [p for p in src.rglob("*") if p.is_file()]

    def one(p: Path) -> None:
        out = dst / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}:
            with Image.open(p) as im:
                ImageOps.mirror(im).save(out)
        else:
            shutil.copy2(p, out)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(one, files))
    print(f"mirrored {len(files)} files of {src} into {dst}")


def _same_rows(a: h5py.File, b: h5py.File) -> None:
    for s in SPLITS:
        if not np.array_equal(a[s]["ids"][()], b[s]["ids"][()]):
            raise SystemExit(f"the two caches hold different images (or another order) in {s}")
    if a.attrs["class_names"] != b.attrs["class_names"]:
        raise SystemExit("the two caches have different classes")


def combine(how: str, first: Path, second: Path, out: Path) -> None:
    """One cache of ``first`` and ``second`` (the same images): their mean (same backbone) or their
    concatenation (the final embeddings side by side; every tap of both, the second's renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(first, "r") as a, h5py.File(second, "r") as b, h5py.File(tmp, "w") as o:
        _same_rows(a, b)
        taps_a, taps_b = json.loads(a.attrs["tap_layers"]), json.loads(b.attrs["tap_layers"])
        if how == "mean" and (taps_a != taps_b or a.attrs["embedding_dim"] != b.attrs["embedding_dim"]):
            raise SystemExit("--how mean needs the same backbone and taps in both caches")
        renamed = [f"b__{t}" for t in taps_b]
        for s in SPLITS:
            g = o.create_group(s)
            for name in ("ids", "labels", "skipped"):
                if name in a[s]:
                    a.copy(a[s][name], g, name)
            pairs = [("embeddings", a[s]["embeddings"], b[s]["embeddings"])]
            pairs += [(f"taps/{t}", a[s]["taps"][t], b[s]["taps"][t]) for t in taps_a] if how == "mean" else []
            for dst, x, y in pairs:
                _write(g, dst, x, y, how)
            if how == "concat":
                for t in taps_a:
                    a.copy(a[s]["taps"][t], g.require_group("taps"), t)
                for t, r in zip(taps_b, renamed):
                    b.copy(b[s]["taps"][t], g.require_group("taps"), r)
        for k, v in a.attrs.items():
            o.attrs[k] = v
        o.attrs["extract_seconds"] = float(a.attrs["extract_seconds"]) + float(b.attrs["extract_seconds"])
        if how == "concat":
            o.attrs["embedding_dim"] = int(a.attrs["embedding_dim"]) + int(b.attrs["embedding_dim"])
            o.attrs["tap_layers"] = json.dumps(taps_a + renamed)
            shapes = json.loads(a.attrs["tap_shapes"]) | dict(zip(renamed, json.loads(b.attrs["tap_shapes"]).values()))
            o.attrs["tap_shapes"] = json.dumps(shapes)
        o.attrs["combined"] = json.dumps({"how": how, "caches": [str(first), str(second)]})
    tmp.replace(out)
    sidecar = first.with_suffix(".json")
    if sidecar.exists():
        shutil.copy2(sidecar, out.with_suffix(".json"))
    print(f"wrote {out}: {how} of {first} and {second}")


def _write(g: h5py.Group, name: str, x: h5py.Dataset, y: h5py.Dataset, how: str) -> None:
    width = x.shape[1] + (y.shape[1] if how == "concat" else 0)
    d = g.create_dataset(name, (x.shape[0], width), np.float32, chunks=(min(256, max(1, x.shape[0])), width))
    for i in range(0, x.shape[0], ROWS):
        xa, ya = x[i : i + ROWS], y[i : i + ROWS]
        d[i : i + ROWS] = (xa + ya) / 2 if how == "mean" else np.hstack([xa, ya])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flip", help="a mirrored copy of a prepared dataset folder")
    f.add_argument("src", type=Path)
    f.add_argument("dst", type=Path)
    c = sub.add_parser("combine", help="one cache of two: mean (flip averaging) or concat (two backbones)")
    c.add_argument("--how", choices=("mean", "concat"), required=True)
    c.add_argument("first", type=Path)
    c.add_argument("second", type=Path)
    c.add_argument("--artifacts", required=True, help="where `heads --artifacts` will find the combined cache")
    c.add_argument("--dataset", required=True)
    args = p.parse_args()
    if args.cmd == "flip":
        flip(args.src, args.dst)
    else:
        combine(args.how, args.first, args.second, Path(args.artifacts) / "features" / args.dataset / args.first.name)


if __name__ == "__main__":
    main()
