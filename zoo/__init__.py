"""zoo: a JAX/Flax long-context model zoo.

import zoo
zoo.list_models()
model = zoo.create_model("transformer", "tiny", seed=0)
model, config = zoo.load("runs/default")           # a trained run's checkpoint, ready for inference
model, meta = zoo.from_pretrained("models/mamba2")  # a model directory, a run, or a Hugging Face checkpoint
tokenizer = zoo.load_tokenizer("models/mamba2")     # the tokenizer that travelled with it (or None)
out = zoo.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=16, temperature=0.7, top_p=0.9, eos=2, seed=0)
"""

import importlib
import importlib.metadata
import sys
import types

# Imported on first use, so that `import zoo` (and `zoo --help`) does not import JAX.
_LAZY = {
    "Generation": "zoo.generate",
    "generate_text": "zoo.generate",
    "create_model": "zoo.models.registry",
    "get_model_config": "zoo.models.registry",
    "list_models": "zoo.models.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")


class _Package(types.ModuleType):
    """`zoo.generate` is the function, also after the submodule of that name is imported (the import
    system sets the package attribute to the submodule; the setter keeps the function)."""

    @property
    def generate(self):
        from zoo.generate import generate

        return generate

    @generate.setter
    def generate(self, value) -> None:
        pass


sys.modules[__name__].__class__ = _Package


def load(workdir: str, step: int | None = None, **model_overrides):
    """The model and run config saved by `zoo train` in `workdir` (latest step by default)."""
    from zoo.checkpoint import load_model

    return load_model(workdir, step, **model_overrides)


def from_pretrained(model_dir: str, step: int | None = None, **model_overrides):
    """(model, meta) of a model directory (or its model.json / params.safetensors file), of a `zoo
    train` work directory (checkpoint `step`, default the latest), or of a Hugging Face / mamba_ssm
    checkpoint, converted in memory by the converters of `zoo convert --from` with the same checks.

    `meta` is model.json's content: {"model_name", "model": the config's fields (`model.config` is
    the config itself), "tokenizer": the tokenizer's spec, "source": what it was loaded from}.
    `zoo convert --from hf SRC --out DIR` writes a converted checkpoint once, to load it faster.
    """
    from zoo.convert.pretrained import load_any

    return load_any(model_dir, step, **model_overrides)


def load_tokenizer(model_dir: str):
    """The tokenizer of a model directory, work directory or checkpoint (`from_pretrained`'s
    sources) as a `zoo.data.tokenizers.Tokenizer`, or None."""
    from zoo.convert.pretrained import find_tokenizer, source_kind
    from zoo.generate import tokenizer_from_spec
    from zoo.model_dir import tokenizer_spec

    kind = source_kind(model_dir)
    if kind in ("hf", "mamba_ssm"):
        return find_tokenizer(model_dir)
    if kind == "run":
        from zoo.checkpoint import read_config
        from zoo.data.tokenizers import run_tokenizer

        return run_tokenizer(read_config(model_dir).data)
    spec = tokenizer_spec(model_dir)
    return None if spec is None else tokenizer_from_spec(spec)


__all__ = [
    "Generation",
    "create_model",
    "from_pretrained",
    "generate",
    "generate_text",
    "get_model_config",
    "list_models",
    "load",
    "load_tokenizer",
]

try:
    __version__ = importlib.metadata.version("longcontext-zoo")
except importlib.metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
    __version__ = "0+unknown"
