"""Work-directory I/O shared by training, evaluation and conversion: JSON files written atomically,
the metrics log (JSONL + TensorBoard event files through tensorboardX, no TensorFlow), flat
parameter files (safetensors, read and written with numpy only).

Every path may be local or remote (`gs://...` and any other filesystem registered with
`etils.epath`): nothing here goes through `os.path` or `open`, and only process 0 writes shared
files. Object stores cannot append, so for a remote work directory the metrics log and TensorBoard
event files are kept in memory and each file is rewritten whole at every flush.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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
    """The JSON value in `file` (a local or remote path); a damaged file is one ValueError naming it."""
    text = path(file).read_text()
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{str(file)!r} is not valid JSON ({e}); restore or delete the file") from None


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
        records = [(ln, _record(ln)) for ln in lines]
        cut = [ln for ln, r in records if ln.strip() and r is None]
        if cut:  # a line cut off by a killed run (or otherwise unreadable): dropped, the log goes on
            print(
                f"zoo: dropped {len(cut)} unreadable line(s) of {str(self.file)!r} (a cut-off write)",
                file=sys.stderr,
                flush=True,
            )
        kept = [ln for ln, r in records if r is not None and (resume_at is None or r["step"] <= resume_at)]
        kept = [ln if ln.endswith("\n") else ln + "\n" for ln in kept]
        if kept != lines:
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


def _record(line: str) -> dict | None:
    """One metrics.jsonl record, or None for a line that is not one (cut off by a killed run)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def read_metrics(workdir) -> list[dict]:
    """The metrics log; after a resume, the last record of each step wins (unreadable lines skipped)."""
    file = path(workdir) / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    if file.exists():
        for line in file.read_text().splitlines():
            rec = _record(line)
            if rec is not None:
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

    try:
        return load(path(file).read_bytes())
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for damaged files
        raise ValueError(
            f"{str(file)!r} is not a readable safetensors file ({type(e).__name__}: {str(e)[:120]}); "
            "write it again (zoo convert, save_pretrained)"
        ) from None


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


def check_out_dir(out, overwrite: bool, flag: str = "--out") -> None:
    """One clear ValueError when output directory `out` is a file, or holds anything and `overwrite`
    is not set: a conversion never replaces a user's files unasked."""
    p = os.path.abspath(os.fspath(out))
    if os.path.exists(p) and not os.path.isdir(p):
        raise ValueError(f"{flag} {str(out)!r} is a file; pass a directory")
    if os.path.isdir(p) and os.listdir(p) and not overwrite:
        raise ValueError(
            f"{flag} {str(out)!r} is not empty; pass --overwrite to replace its contents, or choose a new directory"
        )


@contextlib.contextmanager
def replacing_dir(out, overwrite: bool, flag: str = "--out") -> Iterator[str]:
    """Yields a new temporary directory beside local directory `out` to write into; when the block
    succeeds it takes `out`'s place (renames), when it fails it is removed and `out` is untouched.

    `out` must be empty or missing unless `overwrite` (`check_out_dir`); an interruption between the
    two renames leaves the old contents at `.<name>.zoo-old-<pid>` beside it, never half-written."""
    check_out_dir(out, overwrite, flag)
    final = os.path.abspath(os.fspath(out))
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.zoo-tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        old = os.path.join(parent, f".{name}.zoo-old-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


class WorkdirLock:
    """One writer per work directory: an exclusive `fcntl.flock` on `<workdir>/.zoo.lock`, taken by
    process 0. The kernel grants the lock to one process at a time and releases it when that process
    exits, however it exits (kill -9 included), so a run that died leaves no stale lock. The file is
    never deleted (a new file beside a locked one would admit a second writer); while held it names
    the host, the process id and the start time. Remote work directories (object stores have no
    locks) are not locked."""

    NAME = ".zoo.lock"

    def __init__(self, workdir):
        self.file = path(workdir) / self.NAME
        self.fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0 or is_remote(self.file):
            return self
        import fcntl

        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.file), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            other = self._holder()
            who = (
                f"process {other.get('pid')} on {other.get('host')} (since {other.get('since')})"
                if other
                else "a process"
            )
            raise ValueError(
                f"{str(self.file.parent)!r} is in use by {who}; wait for that run to finish, or use another --workdir"
            ) from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.file.read_text())
        except (OSError, ValueError):
            return None  # the holder has not written its name yet
        return holder if isinstance(holder, dict) else None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # no holder named; the kernel lock goes with the descriptor
            os.close(self.fd)
            self.fd = None
