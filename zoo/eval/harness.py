"""The lm-evaluation-harness model interface over any zoo language model and tokenizer.

    from zoo.eval.harness import ZooLM
    lm = ZooLM(pretrained="models/mamba2")              # a model directory (`zoo convert`) and its tokenizer
    lm = ZooLM(workdir="runs/default")                  # a `zoo train` run: latest checkpoint, its data tokenizer
    lm = ZooLM(model=model, tokenizer=ByteTokenizer(), max_length=512)
    lm.loglikelihood(requests)          # args (context, continuation) -> [(logprob, is_greedy)]
    lm.loglikelihood_rolling(requests)  # args (text,) -> [logprob of the whole text]
    lm.generate_until(requests)         # args (context, {"until": [...], "max_gen_toks": N, ...}) -> [text]

Requests are what lm-eval passes (objects with an `.args` tuple; plain tuples work too). If
`lm_eval` is importable, `ZooLM` subclasses `lm_eval.api.model.LM` and is registered as "zoo":

    python -m zoo.eval.harness --model zoo --model_args pretrained=models/mamba2 --tasks lambada_openai
    # or, in Python: import zoo.eval.harness; lm_eval.simple_evaluate(model="zoo", model_args=..., tasks=[...])

(`python -m zoo.eval.harness` is the entry point: it registers the class and hands its arguments to
lm-eval's own command line; `lm_eval --model zoo` cannot find it, because lm-eval's model registry
takes no plugins from other packages.) model_args win over the same option passed beside them
(lm-eval's command line passes batch_size=1 unless told). Without lm-eval it is a
plain class with the same methods. model_args: pretrained=DIR or workdir=DIR (step=N), max_length,
batch_size, max_gen_toks, prefix_token_id, seed, pad_to_bucket; lm-eval's device and max_batch_size are accepted and
ignored (JAX places the model on its default device).

Semantics:
- Tokens. A pair is encoded as the whole text context + continuation and split where the context's
  own encoding ends (trailing whitespace of the context moves to the continuation, as lm-eval's
  models do); if a subword tokenizer merges across the boundary, the two are encoded apart. An
  empty context is replaced by the prefix token (`prefix_token_id`, default the tokenizer's EOS).
  No other special tokens are added.
- Length. The model sees at most `max_length` tokens (default: the source checkpoint's
  max_position_embeddings for a converted model directory, the training length for a work
  directory, else 2048). A longer context + continuation is truncated on the left (the oldest
  context tokens are dropped); a continuation longer than `max_length` is a ValueError.
- Rolling log-likelihood scores every token of the text, the first given the prefix token, in
  disjoint windows of `max_length` tokens (`zoo.eval.perplexity` with stride = window): the first
  window's tokens see everything before them, a later window's tokens see their window's start and
  the one token before it (the last window is filled up to `max_length` with more context).
- Batching. Requests are sorted by length and batched `batch_size` at a time; rows are padded on
  the right to a power-of-two bucket (causal models ignore right padding), see `score_rows`. HiP's
  block selection scores whole key blocks, including keys after a query inside its block, and its
  dense/sparse switch sees the padded length: pass pad_to_bucket=False (rows grouped by exact
  length, unpadded) for it.
- Generation uses the jitted `zoo.generate` (prompts of mixed lengths in one batch, each exactly as
  alone): greedy unless do_sample with a temperature > 0 (then top_k / top_p as given, per-request
  seeds from `seed`); a row stops at the tokenizer's EOS or after max_gen_toks (default
  `max_gen_toks`) tokens, the decoded text is cut before the first `until` string. The context is
  left-truncated to max_length - max_gen_toks tokens. Stop strings cannot end the compiled loop
  early, so a row always runs to EOS or max_gen_toks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from zoo.eval.perplexity import score_rows, strided_logprobs
from zoo.generate import generate

try:  # lm-eval is optional: register with it when it is there
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _LMBase, _register_model = object, None

DEFAULT_MAX_LENGTH = 2048
DEFAULT_BATCH_SIZE = 8
IGNORED_OPTIONS = ("device", "max_batch_size")  # lm-eval passes these to every model
SAMPLING_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _args(request) -> tuple:
    return tuple(request.args) if hasattr(request, "args") else tuple(request)


def parse_arg_string(arg_string: str) -> dict:
    """lm-eval's model_args "a=1,b=x" as a dict (ints, floats and True/False converted)."""
    out = {}
    for part in filter(None, (p.strip() for p in arg_string.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"model_args item {part!r} is not key=value; write e.g. pretrained=DIR,batch_size=8")
        if value in ("True", "False"):
            out[key] = value == "True"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out


class ZooLM(_LMBase):
    """A zoo language model and its tokenizer behind lm-eval's three request types (module docstring).

    Args:
      pretrained: what `zoo.from_pretrained` takes (a model directory, a work directory, a Hugging
        Face / mamba_ssm checkpoint) and its tokenizer unless `tokenizer` is given.
      workdir: a `zoo train` work directory (its checkpoint at `step`, default the latest; its data
        tokenizer).
      model, tokenizer: a model and a `zoo.data.tokenizers.Tokenizer` object instead of a directory.
      step: the checkpoint step of `workdir`.
      max_length: the most tokens fed to the model (default: see the module docstring).
      batch_size: rows per forward; lm-eval's "auto" means the default, 8.
      max_gen_toks: the default number of new tokens of `generate_until`.
      prefix_token_id: the token before an empty context and a rolling text (default: EOS).
      seed: the sampling seed of `generate_until` (request i of a batch draws with seed + i).
      pad_to_bucket: pad rows on the right to power-of-two buckets (False: batch only rows of one
        exact length, unpadded; for models whose computation depends on the length, e.g. HiP).
    """

    def __init__(
        self,
        pretrained: str | None = None,
        workdir: str | None = None,
        *,
        model=None,
        tokenizer=None,
        step: int | None = None,
        max_length: int | None = None,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = 256,
        prefix_token_id: int | None = None,
        seed: int = 0,
        pad_to_bucket: bool = True,
        **lm_eval_options,
    ):
        if _LMBase is not object:
            super().__init__()
        unknown = sorted(set(lm_eval_options) - set(IGNORED_OPTIONS))
        if unknown:
            raise ValueError(
                f"ZooLM got unknown options {unknown}; it takes pretrained, workdir, step, max_length, batch_size, "
                "max_gen_toks, prefix_token_id, seed, pad_to_bucket"
            )
        sources = sum(x is not None for x in (pretrained, workdir, model))
        if sources != 1:
            raise ValueError("give exactly one of pretrained=DIR, workdir=DIR or model= (with tokenizer=)")
        source_length = None
        if pretrained is not None:
            from zoo.convert.pretrained import load_any
            from zoo.data.tokenizers import from_spec
            from zoo.model_dir import tokenizer_spec

            model, meta = load_any(pretrained, step)
            spec = tokenizer_spec(pretrained, meta)
            tokenizer = tokenizer if tokenizer is not None else None if spec is None else from_spec(spec)
            source_length = ((meta.get("source") or {}).get("config") or {}).get("max_position_embeddings")
        elif workdir is not None:
            from zoo.checkpoint import load_model
            from zoo.data.tokenizers import run_tokenizer

            model, config = load_model(workdir, step)
            tokenizer = tokenizer if tokenizer is not None else run_tokenizer(config.data)
            source_length = config.data.get("seq_len")
        if tokenizer is None:
            raise ValueError(
                f"no tokenizer for {pretrained or 'the model'!r}; pass tokenizer= or convert the model with --tokenizer"
            )
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                f"{model.config.vocab_size}; pass the model's own tokenizer"
            )
        self.model, self.tokenizer = model, tokenizer
        self._max_length = int(max_length or source_length or DEFAULT_MAX_LENGTH)
        if isinstance(batch_size, str):
            if batch_size.startswith("auto"):
                batch_size = DEFAULT_BATCH_SIZE
            elif batch_size.isdigit():
                batch_size = int(batch_size)
        for name, v in (("max_length", self._max_length), ("batch_size", batch_size), ("max_gen_toks", max_gen_toks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be an int >= 1")
        self._batch_size, self._max_gen_toks, self.seed = batch_size, max_gen_toks, int(seed)
        self.pad_to_bucket = bool(pad_to_bucket)
        self.prefix_token_id = tokenizer.eos_id if prefix_token_id is None else int(prefix_token_id)
        if not 0 <= self.prefix_token_id < model.config.vocab_size:
            raise ValueError(f"prefix_token_id={self.prefix_token_id} lies outside the vocabulary")

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> ZooLM:
        """lm-eval's constructor (its command line and `simple_evaluate` with a dict): model_args
        plus its batch_size / max_batch_size / device; an option given in model_args wins over the
        same option passed beside it (lm-eval's command line passes batch_size=1 unless told)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ZooLM:
        """lm-eval's constructor for model_args as a string "pretrained=DIR,batch_size=4"."""
        return cls.create_from_arg_obj(parse_arg_string(arg_string), additional_config)

    # The properties lm-eval's tasks and evaluator read.
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> str:
        return "jax"

    @property
    def tokenizer_name(self) -> str:
        spec = self.tokenizer.spec()
        return f"zoo-{spec['kind']}-{spec.get('sha256', '')[:12]}".rstrip("-")

    def tok_encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) (module docstring, "Tokens")."""
        if not context:
            return [self.prefix_token_id], self.tok_encode(continuation)
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        whole, ctx = self.tok_encode(stripped + continuation), self.tok_encode(stripped)
        if whole[: len(ctx)] == ctx:
            return ctx, whole[len(ctx) :]
        return ctx, self.tok_encode(continuation)

    def _cache(self, kind: str, request, result) -> None:
        hook = getattr(self, "cache_hook", None)
        if hook is not None and hasattr(request, "args"):
            hook.add_partial(kind, request.args, result)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), all continuation tokens greedy) for token-id pairs,
        the context left-truncated so that at most max_length tokens are fed."""
        rows, lengths = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if len(cont) == 0:
                raise ValueError(f"request {i} has an empty continuation; nothing to score")
            if len(ctx) == 0:
                raise ValueError(f"request {i} has an empty context; start it with the prefix token")
            if len(cont) > self.max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds max_length={self.max_length}; "
                    "raise max_length"
                )
            whole = np.concatenate([np.asarray(ctx, np.int64), np.asarray(cont, np.int64)])
            rows.append(whole[-(self.max_length + 1) :])
            lengths.append(len(cont))
        lp, greedy = score_rows(self.model, rows, self.batch_size, self.max_length, self.pad_to_bucket)
        return [(float(a[-n:].sum()), bool(g[-n:].all())) for a, g, n in zip(lp, greedy, lengths)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(log p(continuation | context), is_greedy)] for requests with args (context, continuation)."""
        pairs = []
        for i, r in enumerate(requests):
            args = _args(r)
            if len(args) != 2 or not all(isinstance(a, str) for a in args):
                raise ValueError(f"loglikelihood request {i} has args {args!r}; expected (context, continuation)")
            pairs.append(self.encode_pair(*args))
        out = self.loglikelihood_tokens(pairs)
        for r, res in zip(requests, out):
            self._cache("loglikelihood", r, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[log p(text)] for requests with args (text,): every token scored once, in windows of
        max_length (module docstring)."""
        seqs = []
        for i, r in enumerate(requests):
            args = _args(r)
            if not args or not isinstance(args[0], str):
                raise ValueError(f"loglikelihood_rolling request {i} has args {args!r}; expected (text,)")
            seqs.append([self.prefix_token_id, *self.tok_encode(args[0])])
        lp, _ = strided_logprobs(
            self.model, seqs, self.max_length, self.max_length, self.batch_size, self.pad_to_bucket
        )
        out = [float(a.sum()) for a in lp]
        for r, res in zip(requests, out):
            self._cache("loglikelihood_rolling", r, res)
        return out

    def _sampling(self, i: int, kwargs: dict) -> tuple[tuple[str, ...], tuple]:
        if not isinstance(kwargs, dict):
            raise ValueError(f"generate_until request {i}: gen_kwargs {kwargs!r} is not a dict")
        unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(
                f"generate_until request {i}: unsupported gen_kwargs {unknown}; supported: {SAMPLING_KEYS}"
            )
        until = kwargs.get("until") or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_gen = int(kwargs.get("max_gen_toks") or self.max_gen_toks)
        if max_gen >= self.max_length:
            raise ValueError(
                f"generate_until request {i}: max_gen_toks={max_gen} leaves no room for a context within "
                f"max_length={self.max_length}; lower max_gen_toks or raise max_length"
            )
        temperature = float(kwargs.get("temperature", 1.0 if kwargs.get("do_sample") else 0.0))
        if not kwargs.get("do_sample"):
            temperature = 0.0
        top_k = int(kwargs.get("top_k") or 0) if temperature > 0 else 0
        top_p = float(kwargs.get("top_p") or 1.0) if temperature > 0 else 1.0
        return until, (max_gen, temperature, top_k, top_p)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """[continuation text] for requests with args (context, gen_kwargs) (module docstring)."""
        prompts, untils, groups = [], [], {}
        for i, r in enumerate(requests):
            args = _args(r)
            if len(args) != 2 or not isinstance(args[0], str):
                raise ValueError(f"generate_until request {i} has args {args!r}; expected (context, gen_kwargs)")
            until, sampling = self._sampling(i, args[1])
            ids = self.tok_encode(args[0]) or [self.prefix_token_id]
            prompts.append(ids[-(self.max_length - sampling[0]) :])
            untils.append(until)
            groups.setdefault(sampling, []).append(i)
        eos = self.tokenizer.eos_id
        out: list[str | None] = [None] * len(prompts)
        for (max_gen, temperature, top_k, top_p), idx in groups.items():
            idx = sorted(idx, key=lambda i: len(prompts[i]))  # similar lengths share a batch
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start : start + self.batch_size]
                gen = generate(
                    self.model,
                    [prompts[i] for i in batch],
                    max_gen,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    eos=eos,
                    seed=[self.seed + i for i in batch],
                )
                for i, row in zip(batch, gen.rows()):
                    text = self.tok_decode([t for t in row if t != eos])
                    cuts = [text.find(s) for s in untils[i] if s and s in text]
                    out[i] = text[: min(cuts)] if cuts else text
        for r, res in zip(requests, out):
            self._cache("generate_until", r, res)
        return out


if _register_model is not None:
    ZooLM = _register_model("zoo")(ZooLM)


def main(argv: list[str] | None = None) -> int:
    """`python -m zoo.eval.harness ARGS`: lm-eval's command line with the "zoo" model registered."""
    if _register_model is None:
        print(
            "zoo.eval.harness: error: lm-eval is not installed; `pip install lm-eval` to run its tasks "
            "(ZooLM itself works without it)",
            file=sys.stderr,
        )
        return 2
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
