"""`make predict`: apply the answer (or any method the report compares) to new images.

Images stream through the method's Keras model in batches and every batch's rows go straight to the
output CSV, so 100,000 images need no more memory than 1,000. Each row: the image id, the predicted
class, a probability (``p_<class>``) or decision value (``score_<class>``) per class, the method, and a
status; an unreadable image (or one without the metadata a ``+meta`` method needs, under ``drop``) is
a row with its status, never dropped silently. When the images carry labels (class subfolders named
like the training classes, or ``--image-labels``) the accuracy is printed too.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from pipeline.apply import methods
from pipeline.apply.feature_model import rebuild
from pipeline.artifacts import atomic_path
from pipeline.config import Config
from pipeline.data import IMAGE_EXTENSIONS, image_dataset, load_metadata
from pipeline.errors import PipelineError
from pipeline.extract import runtimes
from pipeline.heads.features import apply_missing

log = logging.getLogger(__name__)


def list_images(source: str | None) -> tuple[Path, list[str]]:
    """(root, ids): a folder searched recursively (ids relative to it), or a text file of paths, one a line."""
    if not source:
        raise PipelineError("predict needs images: --images DIR (or a text file of paths); `make predict IMAGES=DIR`")
    path = Path(source)
    if path.is_dir():
        ids = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        root = path
    elif path.is_file():
        ids = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        root = Path(".")
    else:
        raise PipelineError(f"--images {source}: no such folder or file")
    if not ids:
        raise PipelineError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return root, ids


def true_labels(ids: list[str], class_names: list[str], table: str | None) -> np.ndarray | None:
    """Class index per image from ``--image-labels`` or from class subfolders; None when unknown (-1 where
    a label names no training class)."""
    index = {c: i for i, c in enumerate(class_names)}
    if table:
        labels = load_metadata(Path(table), ids).reindex(ids)
        column = next((c for c in ("label", "class", "y") if c in labels.columns), None)
        if column is None:
            raise PipelineError(f"{table} has no 'label' column")
        return np.array([index.get(str(v), -1) for v in labels[column]], dtype=np.int64)
    folders = [i.split("/")[-2] if "/" in i else None for i in ids]
    if all(f in index for f in folders):
        return np.array([index[f] for f in folders], dtype=np.int64)
    return None


def metadata_block(method: methods.Method, ids: list[str], cfg: Config) -> tuple[np.ndarray | None, np.ndarray]:
    """The encoded metadata per image (as at training time) and which images can be scored."""
    enc = method.encoding
    if enc is None:
        return None, np.ones(len(ids), dtype=bool)
    if not cfg.predict.image_metadata:
        raise PipelineError(f"{method.name} uses metadata: give the new images' table with --image-metadata CSV")
    if cfg.predict.metadata_missing:
        enc.missing = cfg.predict.metadata_missing
    table = load_metadata(Path(cfg.predict.image_metadata), ids, cfg.data.id_column)
    missing = [c for c in enc.columns if c not in table.columns]
    if missing:
        raise PipelineError(f"{cfg.predict.image_metadata} lacks the column(s) {', '.join(missing)} {method.name} uses")
    block = enc.encode(table.reindex(ids))
    keep = apply_missing(block, np.asarray(ids), enc, "new")
    return block.fillna(enc.fill).to_numpy(np.float32), keep


def run(cfg: Config) -> Path:
    """Predict every image; returns the CSV's path."""
    from tqdm.auto import tqdm

    p = cfg.predict
    method = methods.load(cfg, p.method)
    root, ids = list_images(p.images)
    labels = true_labels(ids, method.class_names, p.image_labels)
    meta, keep = metadata_block(method, ids, cfg)
    out = Path(p.output) if p.output else Path(cfg.artifacts) / "predictions" / cfg.dataset_name / f"{method.name}.csv"
    if out.exists():
        log.info("replacing %s", out)
    forward = _forward(method, cfg)
    paths = [str(root / i) for i in np.asarray(ids)[keep]]
    rows_of = np.flatnonzero(keep)  # image position of each scored path
    stats = {"right": 0, "scored": 0, "unreadable": []}
    log.info("predicting %d images with %s (%s)", len(ids), method.name, method.backbone)
    with (
        atomic_path(out, suffix=".csv") as tmp,
        open(tmp, "w", newline="") as f,
        tqdm(total=len(ids), unit="img", desc="predict", disable=None) as bar,
    ):
        writer = csv.writer(f)
        header = _header(method, labels is not None)
        writer.writerow(header)
        done = np.zeros(len(ids), dtype=bool)
        for images, index in image_dataset(paths, method.input_size, p.batch_size) if paths else ():
            at = rows_of[index.numpy()]
            pred, scores = method.apply(forward(images), None if meta is None else meta[at])
            for k, i in enumerate(at):
                writer.writerow(_row(method, ids[i], pred[k], scores, k, labels, i, "ok", stats))
            done[at] = True
            bar.update(len(at))
        for i in np.flatnonzero(~done):
            status = "unreadable" if keep[i] else "no metadata"
            if keep[i]:
                stats["unreadable"].append(ids[i])
            writer.writerow(_row(method, ids[i], None, None, 0, labels, i, status, stats, len(header)))
        bar.update(int((~done).sum()))
    _summary(method, stats, labels is not None, len(ids), out)
    return out


def _forward(method: methods.Method, cfg: Config):
    """A head's feature model in the runtime that filled its cache (``auto``), so its features are the ones
    the head was fitted on, or in ``--runtime``; the fine-tuned models run in TensorFlow."""
    if method.cache is None:
        return runtimes.tf_forward(method.model, method.input_size)
    runtime = cfg.predict.runtime
    runtime = method.cache.get("runtime", "tf") if runtime == "auto" else runtimes.resolve(runtime, False)
    if runtime != "tf" and not runtimes.available(runtime):
        runtime = "tf"
    forward, used = runtimes.forward_for(
        runtime,
        method.model,
        lambda: rebuild(method.cache_file, Path(cfg.artifacts), portable=True)[0],
        runtimes.model_key(method.cache),
        runtimes.store(cfg.artifacts, cfg.extract.runtimes_dir),
    )
    log.info("features in %s", runtimes.NAMES[used])
    return forward


def _header(method: methods.Method, labelled: bool) -> list[str]:
    return ["id", "predicted", "method", "status"] + (["label", "correct"] if labelled else []) + method.score_columns()


def _row(method, image_id, pred, scores, k, labels, i, status, stats, width=None) -> list:
    names = method.class_names
    row = [image_id, names[int(pred)] if pred is not None else "", method.name, status]
    if labels is not None:
        truth = names[labels[i]] if labels[i] >= 0 else ""
        correct = "" if pred is None or labels[i] < 0 else int(pred) == int(labels[i])
        row += [truth, correct]
        if correct != "":
            stats["scored"] += 1
            stats["right"] += int(correct)
    if scores is not None:
        row += [f"{v:.6g}" for v in scores[k]]
    elif width is not None:
        row += [""] * (width - len(row))
    return row


def _summary(method: methods.Method, stats: dict, labelled: bool, n: int, out: Path) -> None:
    if stats["unreadable"]:
        bad = stats["unreadable"]
        log.warning("warning: %d unreadable image(s), listed in the output: %s", len(bad), ", ".join(bad[:10]))
    acc = ""
    if labelled and stats["scored"]:
        acc = f"; accuracy {stats['right'] / stats['scored']:.4f} on the {stats['scored']:,} labelled images scored"
    print(f"\n{method.name} ({method.backbone}) on {n:,} images{acc} -> {out}")
