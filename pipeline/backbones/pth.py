"""Read PyTorch ``.pth`` state dicts into numpy without importing torch.

Torch is a multi-GB dependency we only need for one file format, so this reads
both the legacy (pre-1.6: consecutive pickles + raw storages) and the zip
format with a restricted unpickler that can only build dicts and tensors.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class PthFormatError(ValueError):
    """The file is not a state dict this reader understands."""


@dataclass(frozen=True)
class _StorageType:
    dtype: type


@dataclass
class _TensorRef:
    """A tensor whose storage bytes are read after the pickle (legacy format)."""

    key: str
    dtype: type
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    key, dtype = storage
    return _TensorRef(key, dtype, int(storage_offset), tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Allows only the handful of globals a state dict needs."""

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a .pth file")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        return key, storage_type.dtype


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray]) -> np.ndarray:
    flat = storages[ref.key]
    itemsize = flat.dtype.itemsize
    if not ref.size:
        return flat[ref.offset].copy()
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :],
        shape=ref.size,
        strides=tuple(s * itemsize for s in ref.stride),
        writeable=False,
    )
    return np.array(view)


def _read_legacy(f: io.BufferedIOBase) -> dict[str, np.ndarray]:
    magic = _Unpickler(f).load()
    if magic != _LEGACY_MAGIC:
        raise PthFormatError("not a PyTorch legacy file (bad magic number)")
    _Unpickler(f).load()  # protocol version
    sys_info = _Unpickler(f).load()
    if not sys_info.get("little_endian", True):
        raise PthFormatError("big-endian .pth files are not supported")
    result = _Unpickler(f).load()
    keys = _Unpickler(f).load()
    refs = {k: v for k, v in result.items() if isinstance(v, _TensorRef)}
    dtypes = {r.key: r.dtype for r in refs.values()}
    storages = {}
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        dtype = np.dtype(dtypes.get(key, np.float32))
        storages[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    return {k: _materialise(r, storages) for k, r in refs.items()}


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise PthFormatError("zip .pth without data.pkl")
        prefix = pkl[: -len("data.pkl")]
        result = _Unpickler(io.BytesIO(zf.read(pkl))).load()
        refs = {k: v for k, v in result.items() if isinstance(v, _TensorRef)}
        storages = {r.key: np.frombuffer(zf.read(f"{prefix}data/{r.key}"), dtype=r.dtype) for r in refs.values()}
    return {k: _materialise(r, storages) for k, r in refs.items()}


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return ``{name: array}`` for every tensor in a PyTorch state dict file."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        state = _read_zip(path)
    else:
        with open(path, "rb") as f:
            state = _read_legacy(f)
    if not state:
        raise PthFormatError(f"{path} holds no tensors")
    return state
