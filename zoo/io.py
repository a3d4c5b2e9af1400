"""Work-directory I/O shared by training, evaluation and conversion: JSON files written atomically,
the metrics log (JSONL + TensorBoard event files through tensorboardX, no TensorFlow), flat
parameter files (safetensors, read and written with numpy only).

Every path may be local or remote (`gs://...` and any other filesystem registered with
`etils.epath`): nothing here goes through `os.path` or `open`, and only process 0 writes shared
files. Object stores cannot append, so for a remote work directory the metrics log and TensorBoard
event files are kept in memory and each file is rewritten whole at every flush.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def path(p) -> epath.Path:
    """`p` as an `epath.Path` (local paths, gs://, and every filesystem epath knows)."""
    return epath.Path(p)


def is_remote(p) -> bool:
    """Whether `p` names a file on a remote filesystem (`scheme://...`) rather than a local path."""
    return "://" in str(path(p))


def write_text_atomic(file, text: str) -> None:
    """Writes a file so that a reader never sees half of it.

    Locally: a temporary name, then a rename. On an object store (gs://, s3://, ...) one upload
    already replaces the object atomically, and a rename would be a copy and a delete.
    """
    _write_atomic(path(file), text.encode())


def _write_atomic(file: epath.Path, data: bytes) -> None:
    if is_remote(file):
        file.write_bytes(data)
        return
    tmp = file.parent / f".{file.name}.tmp.{jax.process_index()}"
    tmp.write_bytes(data)
    tmp.replace(file)


def write_json_atomic(file, obj: Any) -> None:
    """Writes JSON atomically (`write_text_atomic`)."""
    write_text_atomic(file, json.dumps(obj, indent=2, sort_keys=True))


def read_json(file) -> Any:
    return json.loads(path(file).read_text())


class MetricsWriter:
    """Appends {"step", **metrics} lines to metrics.jsonl and scalars to TensorBoard (process 0 only).

    A step logged again after a resume replaces its earlier record when the log is read
    (`read_metrics`). Locally every line is appended and flushed at once. In a remote work directory
    (no appends) the log is held in memory, earlier runs' lines included, and rewritten whole by
    `flush()`, at most every `flush_every_s` seconds on `write` (the trainer also flushes at every
    checkpoint, and `close` flushes).
    """

    def __init__(self, workdir, flush_every_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.file = path(workdir) / "metrics.jsonl"
        self.remote = is_remote(workdir)
        self.flush_every_s, self.flushed_at = flush_every_s, time.monotonic()
        if self.remote:
            self.lines = self.file.read_text().splitlines(keepends=True) if self.file.exists() else []
            self.dirty = False
        else:
            self.jsonl = self.file.open("a")
        from tensorboardX import SummaryWriter

        tb_dir = path(workdir) / "tensorboard"
        if self.remote:
            _register_tensorboard_scheme(str(tb_dir).split("://", 1)[0])
        self.tb = SummaryWriter(str(tb_dir))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.remote:
            self.lines.append(line)
            self.dirty = True
            if time.monotonic() - self.flushed_at >= self.flush_every_s:
                self.flush()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        """Makes every record written so far visible in the work directory (TensorBoard's too)."""
        if not self.enabled:
            return
        if self.remote and self.dirty:
            write_text_atomic(self.file, "".join(self.lines))
            self.dirty = False
        self.flushed_at = time.monotonic()
        self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if not self.remote:
            self.jsonl.close()
        self.tb.close()


class _RemoteEventFile:
    """A TensorBoard event file on any epath filesystem: bytes kept in memory, the file rewritten whole
    on every flush (what tensorboardX itself does for gs://, without google-cloud-storage)."""

    def __init__(self, file: str):
        self.file, self.data, self.lock = path(file), bytearray(), threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            self.data += data

    def flush(self) -> None:
        with self.lock:
            self.file.write_bytes(bytes(self.data))

    def close(self) -> None:
        self.flush()


class _RemoteEventFiles:
    """tensorboardX's writer factory for one URI scheme (`register_writer_factory`)."""

    def open(self, file: str) -> _RemoteEventFile:
        return _RemoteEventFile(file)

    def directory_check(self, directory: str) -> None:
        path(directory).mkdir(parents=True, exist_ok=True)  # object stores: nothing to do


def _register_tensorboard_scheme(scheme: str) -> None:
    """Event files under `scheme://` go through epath (tensorboardX alone would make a local folder
    named after the URI for any scheme but gs:// and s3://, and needs google-cloud-storage for gs://)."""
    from tensorboardX import record_writer

    if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _RemoteEventFiles):
        record_writer.register_writer_factory(scheme, _RemoteEventFiles())


def read_metrics(workdir) -> list[dict]:
    """The metrics log; after a resume, the last record of each step wins."""
    file = path(workdir) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if file.exists():
        for line in file.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def save_flat(file, arrays: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """A flat {name: array} dict as a safetensors file (numpy; bf16 kept as bf16)."""
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(np.asarray(v)) for k, v in arrays.items()}, metadata=metadata)
    _write_atomic(path(file), data)


def load_flat(file) -> dict[str, np.ndarray]:
    """{name: numpy array} from a safetensors file."""
    from safetensors.numpy import load

    return load(path(file).read_bytes())
