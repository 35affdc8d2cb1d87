"""`make data`: materialise the embedded datasets as image folders under data/.

Fashion-MNIST comes from the Debian package ``dataset-fashion-mnist`` (IDX
files); nothing is downloaded from a dataset hub. Generated folders carry a
stamp file, so they can be rebuilt when their parameters change, while a folder
without a stamp is the user's and is never touched.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from pipeline.config import Config
from pipeline.data import from_config, load_metadata, stratified_split
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_PACKAGE = "dataset-fashion-mnist"
FASHION_CLASSES = [
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
STAMP = ".prepared.json"


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): magic, dims as big-endian uint32, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise PipelineError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise PipelineError(f"{path} is truncated: {data.size} bytes for shape {tuple(dims)}")
    return data.reshape(dims)


def _idx(name: str) -> Path:
    for candidate in (FASHION_DIR / f"{name}.gz", FASHION_DIR / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(FASHION_DIR / name)


def ensure_fashion_package() -> None:
    """Install the Debian package when missing and we may; otherwise say how."""
    try:
        _idx("train-images-idx3-ubyte")
        return
    except FileNotFoundError:
        pass
    how = f"sudo apt-get update && sudo apt-get install -y {FASHION_PACKAGE}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PipelineError(f"Fashion-MNIST IDX files not found in {FASHION_DIR}; install them with: {how}")
    log.info("installing the Debian package %s", FASHION_PACKAGE)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", FASHION_PACKAGE]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise PipelineError(f"`{' '.join(cmd)}` failed; install the data with: {how}")


def _subset(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified, seeded subset of n indices, and the rest."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels)), np.arange(0)
    rest, chosen = stratified_split(labels, [n / len(labels)], seed)
    return chosen, rest


def _up_to_date(target: Path, params: dict) -> bool:
    """True (and says so) when target already holds exactly this preparation; refuses a user's folder."""
    stamp = target / STAMP
    if not target.exists():
        return False
    if not stamp.exists():
        raise PipelineError(f"{target} exists and was not made by `make data`; move it away or use another DATA name")
    if json.loads(stamp.read_text()) != params:
        return False
    log.info("%s is already prepared (%s)", target, ", ".join(f"{k}={v}" for k, v in params.items()))
    return True


@contextlib.contextmanager
def _staged(target: Path, params: dict):
    """Yield an empty folder beside target; on success it is stamped and swapped in whole."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    (tmp / STAMP).write_text(json.dumps(params, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)


def prepare_fashion_mnist(target: Path, n_train: int, n_val: int, n_test: int, seed: int) -> Path:
    from PIL import Image

    params = {"dataset": "fashion-mnist", "n_train": n_train, "n_val": n_val, "n_test": n_test, "seed": seed}
    if _up_to_date(target, params):
        return target
    ensure_fashion_package()
    x_tr, y_tr = read_idx(_idx("train-images-idx3-ubyte")), read_idx(_idx("train-labels-idx1-ubyte"))
    x_te, y_te = read_idx(_idx("t10k-images-idx3-ubyte")), read_idx(_idx("t10k-labels-idx1-ubyte"))
    train_idx, rest = _subset(y_tr, n_train, seed)
    if n_val > 0:
        val_local, _ = _subset(y_tr[rest], n_val, seed + 1)
        val_idx = rest[val_local]
    else:
        val_idx = rest
    if len(val_idx) == 0:
        train_local, val_local = stratified_split(y_tr[train_idx], [1 / 6], seed + 1)
        train_idx, val_idx = train_idx[train_local], train_idx[val_local]
    test_idx, _ = _subset(y_te, n_test, seed + 2)

    with _staged(target, params) as tmp:
        for split, images, labels, idx, prefix in (
            ("train", x_tr, y_tr, train_idx, "train"),
            ("val", x_tr, y_tr, val_idx, "train"),
            ("test", x_te, y_te, test_idx, "t10k"),
        ):
            for c in FASHION_CLASSES:
                (tmp / split / c).mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i]).save(tmp / split / FASHION_CLASSES[labels[i]] / f"{prefix}-{i:05d}.png")
    log.info("wrote %s: train %d, val %d, test %d images", target, len(train_idx), len(val_idx), len(test_idx))
    return target


ELPV_LEVELS = {0.0: "prob_0", 1 / 3: "prob_1_3", 2 / 3: "prob_2_3", 1.0: "prob_1"}


def load_elpv() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(file names, images, defect probabilities, cell types) from the ``elpv-dataset`` wheel."""
    try:
        from elpv_dataset.utils import load_dataset as elpv_load
    except ImportError:
        raise PipelineError("the elpv data needs `pip install -e .[elpv]` (make data DATA=elpv does it)") from None
    import elpv_dataset

    labels = Path(elpv_dataset.__file__).parent / "data" / "labels.csv"
    names = [line.split()[0].rsplit("/", 1)[-1] for line in labels.read_text().splitlines() if line.strip()]
    images, proba, types = elpv_load()
    return names, images, np.asarray(proba, dtype=float), np.asarray(types)


def elpv_class(p: float, n_classes: int) -> str:
    if n_classes == 2:
        return "defective" if p >= 0.5 else "functional"
    level = min(ELPV_LEVELS, key=lambda v: abs(v - p))
    return ELPV_LEVELS[level]


def prepare_elpv(target: Path, n_classes: int, val_fraction: float, test_fraction: float, seed: int) -> Path:
    """Solar-cell EL images -> data/elpv/{train,val,test}/<class>/cellNNNN.png + metadata.csv.

    Split stratified on class x type; the metadata holds the cell type only,
    nothing derived from the defect probability (that is the label).
    """
    from PIL import Image

    if n_classes not in (2, 4):
        raise PipelineError(f"--elpv-classes must be 2 or 4, not {n_classes}")
    params = {"dataset": "elpv", "classes": n_classes, "val": val_fraction, "test": test_fraction, "seed": seed}
    if _up_to_date(target, params):
        return target
    names, images, proba, types = load_elpv()
    classes = np.asarray([elpv_class(p, n_classes) for p in proba])
    strata = np.unique(np.char.add(np.char.add(classes.astype(str), "|"), types.astype(str)), return_inverse=True)[1]
    parts = stratified_split(strata, [val_fraction, test_fraction], seed)
    import pandas as pd

    with _staged(target, params) as tmp:
        for split, idx in zip(("train", "val", "test"), parts):
            for i in idx:
                folder = tmp / split / classes[i]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i]).save(folder / names[i])
        pd.DataFrame({"image_id": names, "type": types}).to_csv(tmp / "metadata.csv", index=False)
    log.info(
        "wrote %s: %s; data licence CC BY-NC-SA 4.0 (non-commercial)",
        target,
        ", ".join(f"{s} {len(p)}" for s, p in zip(("train", "val", "test"), parts)),
    )
    return target


def run(cfg: Config) -> Path:
    """Prepare an embedded dataset, or validate a user's folder and summarise it."""
    target = cfg.dataset_dir
    name = cfg.data.dataset
    p = cfg.prepare
    if name == "fashion-mnist":
        prepare_fashion_mnist(target, p.n_train, p.n_val, p.n_test, cfg.data.seed)
    elif name == "elpv":
        prepare_elpv(target, p.elpv_classes, cfg.data.val_fraction, cfg.data.test_fraction, cfg.data.seed)
    ds = from_config(cfg)
    log.info("%s", ds.summary())
    if cfg.metadata_path is not None:
        meta = load_metadata(cfg.metadata_path, ds.all_ids(), cfg.data.id_column, ds.name)
        without = len(ds.all_ids()) - len(meta)
        log.info(
            "metadata %s: %d rows, columns %s%s",
            cfg.metadata_path,
            len(meta),
            ", ".join(map(str, meta.columns[:8])),
            f"; {without} images have no row" if without else "",
        )
    return target
