"""RULER-style tasks: answerable from the context (the oracle reproduces every stored answer, so it
scores 1.0), deterministic, exact lengths, a uniform guesser at chance, clear errors."""

import numpy as np
import pytest

from zoo.config import make_config
from zoo.data import ruler
from zoo.data.pipeline import example_source, make_batches

TASKS = [ruler.MultiKeyNeedle, ruler.VariableTracking, ruler.CommonWords]


@pytest.mark.parametrize("cls", TASKS)
@pytest.mark.parametrize("length", [128, 1000])
def test_oracle_solves_every_example_and_lengths_are_exact(cls, length):
    task = cls(length, seed=3)
    for i in range(40):
        ex = task[i]
        assert ex["tokens"].shape == (length + 1,) and ex["tokens"].dtype == np.int32
        assert ex["tokens"].min() >= 0 and ex["tokens"].max() < 256
        k = int(ex["answer_mask"].sum())
        assert k >= 1 and (ex["answer_mask"][-k:] == 1).all() and (ex["loss_mask"] == ex["answer_mask"]).all()
        assert task.solve(ex["tokens"][:-k]) == ex["tokens"][-k:].tolist(), (cls.__name__, i)
    assert ruler.score(task, task.solve, 20) == {"exact_match": 1.0, "token_accuracy": 1.0}


@pytest.mark.parametrize("cls", TASKS)
def test_deterministic_from_seed_and_index(cls):
    a, b, c = cls(200, seed=1), cls(200, seed=1), cls(200, seed=2)
    np.testing.assert_array_equal(a[5]["tokens"], b[5]["tokens"])
    assert not np.array_equal(a[5]["tokens"], a[6]["tokens"]) and not np.array_equal(a[5]["tokens"], c[5]["tokens"])


@pytest.mark.parametrize("cls", TASKS)
def test_uniform_guessing_scores_chance(cls):
    task = cls(200, seed=4)
    rng = np.random.default_rng(0)
    k = int(task[0]["answer_mask"].sum())
    lo = {"MultiKeyNeedle": ruler.VALUES[0] + 1, "VariableTracking": ruler.KEYS[0] + 1, "CommonWords": ruler.VALUES[0]}
    guess = lambda prompt: rng.integers(lo[cls.__name__], lo[cls.__name__] + task.answer_range(), k)  # noqa: E731
    n = 600
    acc = ruler.score(task, guess, n)["token_accuracy"]
    p = ruler.chance(task)
    assert abs(acc - p) < 4 * np.sqrt(p * (1 - p) / (n * k)) + 1e-9, (acc, p)


def test_too_short_and_bad_options_are_value_errors():
    with pytest.raises(ValueError, match="too short"):
        ruler.MultiKeyNeedle(10, num_needles=4)[0]
    with pytest.raises(ValueError, match="too short"):
        ruler.CommonWords(12)[0]
    with pytest.raises(ValueError, match="hops"):
        ruler.VariableTracking(100, hops=40, num_chains=2)
    with pytest.raises(ValueError, match="rare_freq"):
        ruler.CommonWords(100, common_freq=2, rare_freq=2)


@pytest.mark.parametrize("name", list(ruler.TASKS))
def test_tasks_are_data_sources(name):
    config = make_config("transformer", "tiny")
    config.data.source, config.data.seq_len, config.data.batch_size = name, 256, 4
    batch = next(make_batches(config.data, "train"))
    assert batch["inputs"].shape == (4, 256) and batch["answer_mask"].sum() >= 4
    assert isinstance(example_source(config.data, "validation", 512), ruler.TASKS[name])
