"""zoo: a JAX/Flax long-context model zoo.

    import zoo
    zoo.list_models()
    model = zoo.create_model("transformer", "tiny", seed=0)
    model, cfg = zoo.load("runs/default")   # a trained checkpoint, ready for inference
"""
from zoo.models.registry import create_model, get_model_config, list_models


def load(workdir: str, step: int | None = None):
    """Loads the model and run config saved by `zoo train` in `workdir` (latest step by default)."""
    from zoo.train.checkpoint import load_model
    return load_model(workdir, step)


__all__ = ["create_model", "get_model_config", "list_models", "load"]
