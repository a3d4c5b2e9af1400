"""A reader for PyTorch `.bin` checkpoints (`torch.save` of a state dict) without torch.

Since torch 1.6, `torch.save` writes a zip archive:
    <prefix>/data.pkl       a pickle (protocol 2) of the state dict; every tensor is a call
                            torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...) whose
                            storage is a persistent id ("storage", torch.<Type>Storage, key, device, numel)
    <prefix>/data/<key>     the raw bytes of storage <key> (little-endian unless <prefix>/byteorder says "big")
    <prefix>/byteorder, <prefix>/version, ...
`read_torch_bin` unpickles data.pkl with an unpickler that resolves only the globals such files
use (`collections.OrderedDict`, the tensor and parameter rebuild functions, the typed storage
classes): anything else (a pickled object that would run code on load) is refused with a
ValueError. Tensors come back as numpy arrays (bfloat16 as `ml_dtypes.bfloat16`); tensors that
share a storage (tied weights) come back as separate copies.
"""

from __future__ import annotations

import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

# torch.<Name>Storage -> numpy dtype of its elements
STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for a torch.<Type>Storage class inside the pickle: it only names the dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """numpy view of `storage` (a 1-D array) with torch's element offset, size and stride, copied."""
    del requires_grad, hooks, metadata
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return np.array(storage[offset])
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if needed > storage.size:
        raise ValueError(f"a tensor of size {size} and stride {stride} at offset {offset} overruns its storage")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    del requires_grad, hooks
    return data


class _OrderedDict(dict):
    """collections.OrderedDict inside the pickle (a state dict carries a `_metadata` attribute)."""


_GLOBALS = {
    ("collections", "OrderedDict"): _OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(
            f"the checkpoint's pickle refers to {module}.{name}, which a state dict of tensors does not "
            "use; refusing to load it (re-save it as safetensors, or load it with torch yourself)"
        )

    def persistent_load(self, pid) -> np.ndarray:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise ValueError(f"unexpected persistent id {pid!r} in the checkpoint's pickle")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unexpected storage type {storage_type!r} in the checkpoint's pickle")
        if key not in self.storages:
            dtype = storage_type.dtype.newbyteorder(">" if self.byteorder == "big" else "<")
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            data = np.frombuffer(raw, dtype=dtype, count=numel)
            self.storages[key] = data.astype(storage_type.dtype) if self.byteorder == "big" else data
        return self.storages[key]


def read_torch_bin(path) -> dict[str, np.ndarray]:
    """{name: numpy array} of a `torch.save` zip checkpoint (see the module docstring).

    Raises:
      ValueError: for a file that is not a torch zip archive (e.g. the pre-1.6 format), a pickle
        with other globals than a state dict's, or a non-dict top-level object.
    """
    path = str(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a torch zip checkpoint (torch.save since torch 1.6); re-save it with a recent "
            "torch or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path!r} holds {len(pkl)} data.pkl entries; expected one (a torch.save archive)")
        prefix = pkl[0][: -len("/data.pkl")]
        byteorder = "little"
        if f"{prefix}/byteorder" in names:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        with archive.open(pkl[0]) as f:
            obj = _Unpickler(f, archive, prefix, byteorder).load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict of tensors")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # a training checkpoint wrapping one
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path!r}: entries {bad[:5]} are not tensors; give a state dict of tensors")
    return {str(k): v for k, v in obj.items()}
