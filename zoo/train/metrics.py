"""Metrics to a JSONL file and TensorBoard event files (tensorboardX: no TensorFlow needed)."""
from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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


def read_metrics(workdir: str) -> list[dict]:
    """The metrics log; after a resume, the last record of each step wins."""
    path = os.path.join(workdir, "metrics.jsonl")
    by_step: dict[int, dict] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]
