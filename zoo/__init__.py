"""zoo: a JAX/Flax long-context model zoo.

import zoo
zoo.list_models()
model = zoo.create_model("transformer", "tiny", seed=0)
model, config = zoo.load("runs/default")           # a trained run's checkpoint, ready for inference
model, meta = zoo.from_pretrained("models/mamba2")  # a model directory (zoo convert)
"""

from zoo.models.registry import create_model, get_model_config, list_models


def load(workdir: str, step: int | None = None, **model_overrides):
    """The model and run config saved by `zoo train` in `workdir` (latest step by default)."""
    from zoo.checkpoint import load_model

    return load_model(workdir, step, **model_overrides)


def from_pretrained(model_dir: str, **model_overrides):
    """The model and its description (model.json) from a model directory."""
    from zoo.checkpoint import load_pretrained

    return load_pretrained(model_dir, **model_overrides)


__all__ = ["create_model", "from_pretrained", "get_model_config", "list_models", "load"]
