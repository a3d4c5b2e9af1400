"""Reading other codebases' checkpoints with numpy only: config.json, safetensors (also bf16 and
sharded), torch `.bin` (`zoo.convert.torch_bin`, no torch), and the key bookkeeping of a converter.

A converter takes every source tensor it uses through `SourceWeights.take(key, shape)` (one clear
ValueError naming the key on a missing key, a wrong shape or a non-float dtype), declares the
tensors it deliberately leaves out with `SourceWeights.ignore(key, reason)`, and calls `finish()`,
which refuses any key left unaccounted for and returns the report written into model.json.

safetensors layout (https://github.com/huggingface/safetensors): 8 bytes little-endian header size
n, a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian data. `safetensors.numpy` has no bfloat16, hence the small reader and
writer here (bfloat16 through `ml_dtypes`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

from zoo.convert.torch_bin import read_torch_bin

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def read_safetensors(path) -> dict[str, np.ndarray]:
    """{name: array} of a safetensors file, any dtype of `SAFETENSORS_DTYPES` (memory-mapped)."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path!r} is not a safetensors file (shorter than its 8-byte header size)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path!r} is not a safetensors file (its header is not JSON: {e})") from e
    size = os.path.getsize(path) - 8 - n  # bytes of tensor data the file holds
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    if ends and max(ends) > size:
        raise ValueError(
            f"{path!r} is truncated: its header describes {max(ends)} bytes of tensor data but the file holds "
            f"{max(size, 0)}; download or write it again"
        )
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path!r}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
        dtype = SAFETENSORS_DTYPES[info["dtype"]].newbyteorder("<")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{path!r}: tensor {name!r} has {end - begin} bytes for shape {shape} of {info['dtype']}")
        out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes {name: array} as a safetensors file (keys sorted, header padded to 8 bytes)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, arrays = 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r} has dtype {a.dtype}, which safetensors cannot hold")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": _DTYPE_NAMES[a.dtype.newbyteorder("=")], "shape": list(a.shape)}
        header[name]["data_offsets"] = [offset, offset + a.nbytes]
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def _decode_special_floats(obj):
    """transformers 5 writes float('inf') in config.json as {"__float__": "Infinity"}."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_special_floats(v) for v in obj]
    return obj


def checkpoint_dir(src) -> str:
    """The directory of a checkpoint given as a directory or as one of its weight files."""
    src = str(src)
    if not os.path.exists(src):
        raise ValueError(f"checkpoint {src!r} does not exist; give a directory with config.json or a weight file")
    return src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src))


def read_config(src) -> dict:
    """config.json of a checkpoint directory (or beside a weight file); Infinity and HF 5's
    {"__float__": ...} encodings decode to floats."""
    file = os.path.join(checkpoint_dir(src), "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{checkpoint_dir(src)!r} has no config.json; the converter needs the model's config")
    with open(file) as f:
        return _decode_special_floats(json.load(f))


def _shards(directory: str, index_name: str) -> list[str]:
    with open(os.path.join(directory, index_name)) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        raise ValueError(f"{directory!r}: shards {missing} listed in {index_name} are missing")
    return [os.path.join(directory, s) for s in files]


def weight_files(src) -> list[str]:
    """The weight files of a checkpoint: a given file, else (in this order of preference)
    model.safetensors, its sharded index, pytorch_model.bin, its sharded index."""
    src = str(src)
    if os.path.isfile(src):
        return [src]
    directory = checkpoint_dir(src)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        if os.path.isfile(os.path.join(directory, index)):
            return _shards(directory, index)
    raise ValueError(
        f"{directory!r} holds no model.safetensors, pytorch_model.bin or sharded index of either; "
        "give the directory of a checkpoint or its weight file"
    )


def read_weights(src) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint (directory or file): safetensors or torch `.bin`, any shards."""
    out: dict[str, np.ndarray] = {}
    for file in weight_files(src):
        tensors = read_safetensors(file) if file.endswith(".safetensors") else read_torch_bin(file)
        dup = sorted(set(tensors) & set(out))
        if dup:
            raise ValueError(f"{file!r} repeats tensors {dup[:5]} of another shard")
        out.update(tensors)
    return out


class SourceWeights:
    """The tensors of a source checkpoint with the bookkeeping of which ones a converter used."""

    def __init__(self, tensors: dict[str, np.ndarray], where: str):
        self.tensors, self.where = tensors, where
        self.used: set[str] = set()
        self.ignored: dict[str, str] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `key` as float32, checked against `shape` (the shape the config implies)."""
        if key not in self.tensors:
            raise ValueError(f"{self.where}: tensor {key!r} is missing (expected shape {tuple(shape)})")
        a = self.tensors[key]
        if a.dtype.name not in FLOAT_DTYPES:
            raise ValueError(f"{self.where}: tensor {key!r} has dtype {a.dtype.name}; expected a float tensor")
        if tuple(a.shape) != tuple(shape):
            raise ValueError(
                f"{self.where}: tensor {key!r} has shape {tuple(a.shape)}, but the config implies {tuple(shape)}"
            )
        self.used.add(key)
        return np.array(a, np.float32)  # a copy: the source may be a memory map

    def ignore(self, key: str, reason: str) -> None:
        """Declares `key` deliberately unused (it appears in the report with the reason)."""
        if key in self.tensors:
            self.ignored[key] = reason

    def finish(self) -> dict:
        """The report {"tensors", "used", "ignored": {key: reason}}; refuses unaccounted keys."""
        left = sorted(set(self.tensors) - self.used - set(self.ignored))
        if left:
            raise ValueError(
                f"{self.where}: {len(left)} tensor(s) that this converter does not know: {left[:8]}"
                f"{'...' if len(left) > 8 else ''}; the checkpoint has parts the zoo model lacks"
            )
        return {"tensors": len(self.tensors), "used": len(self.used), "ignored": dict(sorted(self.ignored.items()))}
