"""Find images, labels, splits and metadata; build the tf.data input pipeline.

A dataset is a folder of class subfolders, either already split into
``train/ val/ test/`` or one folder that we split with a seeded stratified split.
Every image is named by its *id*: its path relative to the dataset folder, so
embeddings, labels and metadata rows can always be re-joined by name.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import resources
from pipeline.errors import PipelineError, first_line

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif"}
ID_COLUMNS = ("image_id", "id", "filename", "file", "image")


@dataclass
class Split:
    ids: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Dataset:
    name: str
    root: Path
    class_names: list[str]
    splits: dict[str, Split]
    ignored: list[str] = field(default_factory=list)

    def all_ids(self) -> list[str]:
        return [i for s in SPLITS for i in self.splits[s].ids]

    def paths(self, split: str) -> list[str]:
        return [str(self.root / i) for i in self.splits[split].ids]

    def fingerprint(self) -> str:
        """Changes when any file is added, removed, relabelled, resized or touched."""
        h = hashlib.sha256()
        for split in SPLITS:
            s = self.splits[split]
            for i, y in zip(s.ids, s.labels):
                st = (self.root / i).stat()
                h.update(f"{split}\0{i}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def with_train(self, keep: np.ndarray) -> Dataset:
        """The same dataset with only the training images at positions ``keep`` (val and test unchanged)."""
        t = self.splits["train"]
        splits = {**self.splits, "train": Split([t.ids[i] for i in keep], t.labels[keep])}
        return Dataset(self.name, self.root, self.class_names, splits, self.ignored)

    def summary(self) -> str:
        sizes = ", ".join(f"{s} {len(self.splits[s])}" for s in SPLITS)
        return f"{self.name}: {len(self.class_names)} classes, {sizes}"


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    out: dict[str, list[Path]] = {}
    for c in classes:
        out[c.name] = sorted(p for p in c.rglob("*") if p.is_file() and not p.name.startswith("."))
    return out


def stratified_split(labels: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Split indices into len(fractions)+1 parts, per class, seeded; the rest goes first."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        counts = [int(round(f * n)) for f in fractions]
        start = n - sum(counts)
        parts[0].extend(idx[:start])
        for k, cnt in enumerate(counts):
            parts[k + 1].extend(idx[start : start + cnt])
            start += cnt
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def nested_subset(labels: np.ndarray, n: int, seed: int, min_per_class: int = 2) -> np.ndarray:
    """Sorted indices of a stratified subset of about ``n`` items, at least ``min_per_class`` of each
    class (as many as it has, if fewer). Subsets of one seed are nested: a larger ``n`` keeps every
    item a smaller one took, so learning-curve points differ only by the images added."""
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if n >= len(labels):
        return np.arange(len(labels))
    share = counts * n / len(labels)
    take = np.floor(share).astype(int)
    for k in np.argsort(-(share - take))[: n - int(take.sum())]:  # largest remainders get the rest
        take[k] += 1
    take = np.minimum(np.maximum(take, min_per_class), counts)
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def load_dataset(root: Path, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0) -> Dataset:
    """Read a class-subfolder dataset, split or not, into ids and labels."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist (run `make data` or give DATA=path/to/images)")
    presplit = (root / "train").is_dir()
    found = (
        {s: _scan_classes(root / s) for s in SPLITS if (root / s).is_dir()}
        if presplit
        else {"all": _scan_classes(root)}
    )

    class_names = sorted({c for per_split in found.values() for c in per_split})
    if not class_names:
        raise PipelineError(f"{root} has no class subfolders (expected {root}/<class>/<image>)")
    if len(class_names) < 2:
        raise PipelineError(f"{root} has a single class ({class_names[0]}); a classifier needs at least two")

    ignored: list[str] = []
    index = {c: i for i, c in enumerate(class_names)}
    collected: dict[str, tuple[list[str], list[int]]] = {}
    for split, per_class in found.items():
        ids, labels = [], []
        for cname, files in per_class.items():
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
            ignored.extend(f.relative_to(root).as_posix() for f in files if f.suffix.lower() not in IMAGE_EXTENSIONS)
            if not images:
                where = f"{root.name}/{split}/{cname}" if presplit else f"{root.name}/{cname}"
                raise PipelineError(f"class folder {where} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            ids.extend(f.relative_to(root).as_posix() for f in images)
            labels.extend([index[cname]] * len(images))
        collected[split] = (ids, labels)
    if ignored:
        log.warning("warning: ignoring %d non-image files, e.g. %s", len(ignored), ", ".join(ignored[:3]))

    splits: dict[str, Split] = {}
    if presplit:
        for s, (ids, labels) in collected.items():
            splits[s] = Split(ids, np.asarray(labels, dtype=np.int64))
        missing = [s for s in ("val", "test") if s not in splits]
        if missing:
            fr = {"val": val_fraction, "test": test_fraction}
            tr = splits["train"]
            parts = stratified_split(tr.labels, [fr[m] for m in missing], seed)
            splits["train"] = Split([tr.ids[i] for i in parts[0]], tr.labels[parts[0]])
            for m, p in zip(missing, parts[1:]):
                splits[m] = Split([tr.ids[i] for i in p], tr.labels[p])
    else:
        ids, labels = collected["all"]
        y = np.asarray(labels, dtype=np.int64)
        tr, va, te = stratified_split(y, [val_fraction, test_fraction], seed)
        for s, p in zip(SPLITS, (tr, va, te)):
            splits[s] = Split([ids[i] for i in p], y[p])
    return _checked(root, class_names, splits, ignored)


def _checked(root: Path, class_names: list[str], splits: dict[str, Split], ignored: list[str]) -> Dataset:
    """The dataset, once every split has images (one-line error otherwise) and small classes are said."""
    for s in SPLITS:
        if len(splits[s]) == 0:
            raise PipelineError(f"split '{s}' of {root} is empty; add images or change the split fractions")
    _warn_small_classes(splits, class_names)
    return Dataset(root.resolve().name, root, class_names, splits, ignored)


def _warn_small_classes(splits: dict[str, Split], class_names: list[str]) -> None:
    """A class too small to reach every split is silently unmeasured: say which, and what it means."""
    counts = {s: np.bincount(splits[s].labels, minlength=len(class_names)) for s in SPLITS}
    for c, name in enumerate(class_names):
        absent = [s for s in SPLITS if counts[s][c] == 0]
        if not absent:
            continue
        total = sum(int(counts[s][c]) for s in SPLITS)
        effects = []
        if "test" in absent:
            effects.append("the test accuracy cannot speak for it")
        if "val" in absent:
            effects.append("tuning never sees it")
        if "train" in absent:
            effects.append("no model learns it")
        log.warning(
            "warning: class '%s' has %d image%s and none in %s: %s (add images, or merge or drop the class)",
            name,
            total,
            "" if total == 1 else "s",
            " or ".join(absent),
            "; ".join(effects),
        )


def load_labelled(
    root: Path,
    labels_path: Path,
    label_column: str | None,
    id_column: str | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> Dataset:
    """A flat folder of images whose classes come from a table (CelebA, most Kaggle sets): each image's
    class is ``label_column`` of its row, matched by the same id rules as metadata; the split is the
    seeded stratified one. Images without a row or without a label are left out, with a warning."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise PipelineError(f"{root} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    ids = [f.relative_to(root).as_posix() for f in files]
    table = load_metadata(labels_path, ids, id_column, root.name)
    if not label_column:
        raise PipelineError(f"--labels {labels_path} needs --label-column (one of: {', '.join(table.columns[:12])})")
    if label_column not in table.columns:
        raise PipelineError(
            f"labels table {labels_path} has no column '{label_column}' (columns: {', '.join(table.columns[:12])})"
        )
    values = table[label_column].reindex(ids)
    unlabelled = [i for i, v in zip(ids, values) if pd.isna(v)]
    if unlabelled:
        log.warning(
            "warning: %d images have no row or no '%s' in %s (left out), e.g. %s",
            len(unlabelled),
            label_column,
            labels_path,
            ", ".join(unlabelled[:5]),
        )
    values = values.dropna()
    present = sorted(values.unique(), key=lambda v: (str(type(v)), v))
    if len(present) < 2:
        raise PipelineError(f"column '{label_column}' of {labels_path} has {len(present)} class(es); need two or more")
    if set(present) == {-1, 1}:  # CelebA's binary attributes
        names = {-1: f"not_{label_column}", 1: label_column}
    else:
        names = {v: str(v) for v in present}
    class_names = [names[v] for v in present]
    y = values.map({v: k for k, v in enumerate(present)}).to_numpy(dtype=np.int64)
    kept = list(values.index)
    parts = stratified_split(y, [val_fraction, test_fraction], seed)
    splits = {s: Split([kept[i] for i in p], y[p]) for s, p in zip(SPLITS, parts)}
    return _checked(root, class_names, splits, [])


def from_config(cfg) -> Dataset:
    """The dataset a Config names: class subfolders, or a flat folder with --labels."""
    d = cfg.data
    if d.labels:
        return load_labelled(
            cfg.dataset_dir, Path(d.labels), d.label_column, d.id_column, d.val_fraction, d.test_fraction, d.seed
        )
    return load_dataset(cfg.dataset_dir, d.val_fraction, d.test_fraction, d.seed)


def _read_celeba_table(path: Path) -> pd.DataFrame | None:
    """CelebA's ``list_attr_celeba.txt`` layout (a row-count line, a header of N names, then rows of
    ``filename v1 ... vN`` separated by whitespace), or None for any other file."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first, header, row = f.readline().split(), f.readline().split(), f.readline().split()
    if len(first) != 1 or not first[0].isdigit() or not header or len(row) != len(header) + 1:
        return None
    df = pd.read_csv(path, sep=r"\s+", skiprows=2, header=None, names=["image_id", *header], dtype={0: str})
    log.info("read %s as a whitespace-separated attribute table (%d rows, %d columns)", path.name, *df.shape)
    return df


def load_metadata(
    path: Path, ids: list[str], id_column: str | None = None, dataset_name: str = "the dataset"
) -> pd.DataFrame:
    """Read a metadata CSV and index it by dataset id (one row per image, validated).

    ``ids`` are the dataset's image ids (relative paths). Metadata files name
    images by filename (CelebA), stem, or relative path; we accept whichever of
    those matches uniquely, and refuse duplicates or unknown ids rather than
    guess an alignment. Images without a row are the caller's policy to handle.
    """
    path = Path(path)
    try:
        df = _read_celeba_table(path)
        if df is None:
            df = pd.read_csv(path)
    except FileNotFoundError:
        raise PipelineError(f"metadata file {path} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PipelineError(f"metadata file {path} is not a readable CSV: {first_line(e)}") from None
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in df.columns), df.columns[0])
    if id_column not in df.columns:
        raise PipelineError(f"metadata {path} has no column '{id_column}' (columns: {', '.join(df.columns[:10])})")
    keys = df[id_column].astype(str)
    dup = keys[keys.duplicated()].unique()
    if len(dup):
        raise PipelineError(f"metadata {path} has duplicate ids in '{id_column}': {', '.join(dup[:5])}")

    all_ids = list(ids)
    for keyfn in (lambda i: i, lambda i: i.rsplit("/", 1)[-1], lambda i: i.rsplit("/", 1)[-1].rsplit(".", 1)[0]):
        mapped = [keyfn(i) for i in all_ids]
        if len(set(mapped)) == len(mapped) and keys.isin(mapped).any():
            break
    else:
        raise PipelineError(
            f"metadata {path} ids in '{id_column}' (e.g. {keys.iloc[0]}) match no image of {dataset_name} "
            f"by relative path, filename or stem (e.g. {all_ids[0]})"
        )
    lookup = dict(zip(mapped, all_ids))
    known = keys.isin(lookup)
    if not known.all():  # e.g. CelebA's attribute file for the whole set, next to the subset trained on
        unknown = keys[~known]
        log.warning(
            "warning: metadata %s has %d rows for images not in %s (ignored), e.g. %s",
            path,
            len(unknown),
            dataset_name,
            ", ".join(unknown[:5]),
        )
        df, keys = df[known.to_numpy()], keys[known]
    df = df.assign(**{id_column: keys.map(lookup)}).set_index(id_column)
    df.index.name = "id"
    return df


def load_image(path, image_size: int):
    """One image file -> float32 0-255 RGB, ``image_size`` square: the ops every engine decodes with."""
    import tensorflow as tf

    img = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    img = tf.image.resize(img, (image_size, image_size))
    return tf.ensure_shape(img, (image_size, image_size, 3))


def image_dataset(
    paths: list[str],
    image_size: int,
    batch_size: int,
    labels: np.ndarray | None = None,
    *,
    shuffle_seed: int | None = None,
):
    """Parallel decode + resize + batch + prefetch, overlapped with the consumer.

    Elements are ``(images, index)`` batches (``(images, labels)`` when labels are
    given): images are float32 0-255 RGB, ``image_size`` square (gray is
    replicated to three channels); ``index`` is each image's position in
    ``paths``. An unreadable file is dropped rather than aborting the run; the
    caller sees which by the gap in ``index``.
    """
    import tensorflow as tf

    second = np.arange(len(paths), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(paths, dtype=object), second))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)

    def load(path, tag):
        return load_image(path, image_size), tag

    ds = ds.map(load, num_parallel_calls=resources.cores(), deterministic=True).ignore_errors()
    return steady(ds.batch(batch_size).prefetch(2))


def steady(ds):
    """``ds`` without tf.data's autotuning. It runs a model thread per iterator, and destroying an iterator
    (Keras makes one per epoch and per validation pass) waits for that thread, and on a few cores that wait
    can leave them all idle for seconds per epoch (benchmarks/NOTES.md). Callers set their parallelism (every
    core for decoding) and prefetch themselves."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)
