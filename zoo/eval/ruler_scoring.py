"""RULER-style tasks (`zoo.data.ruler`) scored through a zoo language model by greedy decoding.

    from zoo.data import ruler
    from zoo.eval.ruler_scoring import greedy_answers, model_predictor, ruler_report, score_model
    ruler.score(ruler.MultiKeyNeedle(1024), model_predictor(model), n=50)        # one prompt at a time
    score_model(model, ruler.VariableTracking(1024), n=50, batch_size=16)        # batched, same numbers
    greedy_answers(model, ruler.CommonWords(1024), n=50)                          # int32 [n, answer length]
    ruler_report(model, lengths=[1024, 4096], n=50)  # {task: {length: {exact_match, token_accuracy, chance}}}

The prediction of a prompt is the model's greedy continuation by `zoo.generate` (jitted, KV cache /
recurrent state), as many tokens as the task's answer. Exact match equals teacher-forced argmax
exact match (if every answer token is the argmax given the true earlier ones, greedy decoding emits
exactly them); token accuracy is that of the free-running continuation, so a wrong first token can
cost the later ones. The tasks are token-level over ids 0..255: the model's vocabulary must cover them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from zoo.data import ruler
from zoo.generate import generate


def _check_vocab(model) -> None:
    if model.config.vocab_size < 256:
        raise ValueError(
            f"the RULER tasks use token ids 0..255 but the model's vocab_size is {model.config.vocab_size}; "
            "use a model with a vocabulary of at least 256"
        )


def answer_length(task) -> int:
    """Tokens in the answer of every example of the task (constant per task configuration)."""
    return int(task[0]["answer_mask"].sum())


def model_predictor(model, max_new_tokens: int = 8) -> Callable[[np.ndarray], np.ndarray]:
    """`predict(prompt tokens) -> answer tokens` for `zoo.data.ruler.score`: the greedy continuation
    of `max_new_tokens` tokens (at least the task's answer length; `score` reads the first ones)."""
    _check_vocab(model)

    def predict(prompt: np.ndarray) -> np.ndarray:
        return generate(model, [np.asarray(prompt, np.int32)], max_new_tokens).tokens[0]

    return predict


def greedy_answers(model, task, n: int, batch_size: int = 8) -> np.ndarray:
    """int32 [n, k]: the model's greedy k-token answers (k = the task's answer length) to the prompts
    of the first n examples, generated `batch_size` prompts at a time."""
    _check_vocab(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an int >= 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1")
    k = answer_length(task)
    prompts = [task[i]["tokens"][:-k] for i in range(n)]
    rows = [generate(model, prompts[s : s + batch_size], k).tokens for s in range(0, n, batch_size)]
    return np.concatenate(rows)


def score_model(model, task, n: int, batch_size: int = 8) -> dict[str, float]:
    """`zoo.data.ruler.score` of the model's `greedy_answers` on the first n examples, plus the
    task's chance accuracy."""
    answers = iter(greedy_answers(model, task, n, batch_size))  # `score` asks for examples 0 .. n-1 in order
    result = ruler.score(task, lambda prompt: next(answers), n)
    return {**result, "chance": ruler.chance(task)}


def ruler_report(
    model, lengths: Sequence[int], n: int, tasks: Sequence[str] = tuple(ruler.TASKS), batch_size: int = 8, seed: int = 0
) -> dict:
    """{task name: {length: score_model(...)}} of each task (`zoo.data.ruler.TASKS` names, default
    options, the given seed) at each length."""
    unknown = [t for t in tasks if t not in ruler.TASKS]
    if unknown:
        raise ValueError(f"unknown RULER tasks {unknown}; choose from {list(ruler.TASKS)}")
    return {
        name: {
            int(length): score_model(model, ruler.TASKS[name](int(length), seed=seed), n, batch_size)
            for length in lengths
        }
        for name in tasks
    }
