"""Work-directory I/O shared by training, evaluation and conversion: JSON files written atomically,
the metrics log (JSONL + TensorBoard event files through tensorboardX, no TensorFlow), flat
parameter files (safetensors, read and written with numpy only).

Every path may be local or remote (`gs://...` and other `etils.epath` filesystems): nothing here
goes through `os.path`, and only process 0 writes shared files.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
from etils import epath


def path(p) -> epath.Path:
    """`p` as an `epath.Path` (local paths, gs://, and every filesystem epath knows)."""
    return epath.Path(p)


def write_json_atomic(file, obj: Any) -> None:
    """Writes JSON to a temporary name, then renames it: a reader never sees half a file."""
    file = path(file)
    tmp = file.parent / f".{file.name}.tmp.{jax.process_index()}"
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.rename(file)


def read_json(file) -> Any:
    return json.loads(path(file).read_text())


class MetricsWriter:
    """Appends {"step", **metrics} lines to metrics.jsonl and scalars to TensorBoard (process 0 only).

    A step logged again after a resume replaces its earlier record when the log is read
    (`read_metrics`), and `truncate_after(step)` drops the records a resumed run will replay.
    """

    def __init__(self, workdir):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.file = path(workdir) / "metrics.jsonl"
        self.jsonl = self.file.open("a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


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
    file = path(file)
    tmp = file.parent / f".{file.name}.tmp"
    tmp.write_bytes(data)
    tmp.rename(file)


def load_flat(file) -> dict[str, np.ndarray]:
    """{name: numpy array} from a safetensors file."""
    from safetensors.numpy import load

    return load(path(file).read_bytes())
