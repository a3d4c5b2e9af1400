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
import os
import socket
import tempfile
import threading
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def path(p) -> epath.Path:
    """`p` as an `epath.Path` (local paths, gs://, and every filesystem epath knows); a local path is
    made absolute (Orbax refuses relative checkpoint paths, and a later chdir must not move a run)."""
    text = os.fspath(p) if isinstance(p, os.PathLike) else str(p)
    return epath.Path(text if "://" in text else os.path.abspath(text))


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
    """The JSON value in `file` (a local or remote path)."""
    return json.loads(path(file).read_text())


class MetricsWriter:
    """Appends {"step", **metrics} lines to metrics.jsonl and scalars to TensorBoard (process 0 only).

    A step logged again after a resume replaces its earlier record when the log is read
    (`read_metrics`). Locally every line is appended and flushed at once. In a remote work directory
    (no appends) the log is held in memory, earlier runs' lines included, and rewritten whole by
    `flush()`, at most every `flush_every_s` seconds on `write` (the trainer also flushes at every
    checkpoint, and `close` flushes).
    """

    def __init__(self, workdir, flush_every_s: float = 30.0, resume_at: int | None = None):
        """`resume_at`: the step a resumed run continues from; records of later steps (which the run
        replays) are dropped first, so the log never holds a step twice."""
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.file = path(workdir) / "metrics.jsonl"
        self.remote = is_remote(workdir)
        self.flush_every_s, self.flushed_at = flush_every_s, time.monotonic()
        lines = self.file.read_text().splitlines(keepends=True) if self.file.exists() else []
        kept = [ln for ln in lines if ln.strip() and (resume_at is None or json.loads(ln)["step"] <= resume_at)]
        if len(kept) != len(lines):
            write_text_atomic(self.file, "".join(kept))
        if self.remote:
            self.lines, self.dirty = kept, False
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


def check_writable_dir(workdir, what: str = "the work directory") -> None:
    """One clear ValueError when `workdir` is a file or cannot be written.

    Permission bits are not enough (root passes `os.access` on a read-only mount), so a hidden
    empty file is created and removed in the nearest existing directory; nothing else is touched.
    """
    p = path(workdir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {str(p)!r} is a file, not a directory; pass a directory for --workdir")
    if is_remote(p):
        return  # object stores: permissions show only when writing
    local = os.path.abspath(str(p))
    while not os.path.exists(local):  # the nearest existing ancestor must be writable to create it
        local = os.path.dirname(local)
    if not os.path.isdir(local):
        raise ValueError(f"{what} {str(p)!r} cannot be created: {local!r} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".zoo-write-probe-", dir=local)
    except OSError as e:
        raise ValueError(
            f"{what} {str(p)!r} is not writable ({local!r}: {e.strerror}); choose another --workdir"
        ) from None
    os.close(fd)
    os.unlink(probe)


class WorkdirLock:
    """One writer per work directory: a lock file `<workdir>/.zoo.lock` holding the host, the process id
    and the start time, created exclusively by process 0. A lock left by a run that died (kill -9) is
    recognised as stale when its host is this one and its process is gone, and taken over. Remote work
    directories (no exclusive create on object stores) are not locked."""

    NAME = ".zoo.lock"

    def __init__(self, workdir):
        self.file = path(workdir) / self.NAME
        self.held = False

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0 or is_remote(self.file):
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(str(self.file), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._holder()
                if other is not None and not self._stale(other):
                    raise ValueError(
                        f"{str(self.file.parent)!r} is in use by process {other.get('pid')} on {other.get('host')} "
                        f"(since {other.get('since')}); wait for it, or delete {str(self.file)!r} if that run is gone"
                    ) from None
                self.file.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ValueError(f"could not take the lock {str(self.file)!r}; another run is starting in the same directory")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None  # unreadable: half-written by a run killed while taking it

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # another host's process cannot be checked from here
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False
