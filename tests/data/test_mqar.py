"""MQAR as Zoology generates it: pairs first, every key queried once at a power-law gap, keys and
values from disjoint halves of the vocabulary, loss only on the recalled values, determinism, and
its use as a data source of the pipeline."""

import numpy as np
import pytest
from data_testing import data_config

from zoo.data.pipeline import FixedLengthBatches, example_source
from zoo.data.synthetic import MQAR


def _queries(task: MQAR, ex: dict) -> tuple[np.ndarray, np.ndarray]:
    """The query positions (inputs) and the gaps g they were drawn with (position = 2n + 2g)."""
    at = np.flatnonzero(ex["answer_mask"])
    return at, (at - 2 * task.num_pairs) // 2


@pytest.mark.parametrize("length,num_pairs", [(64, 4), (128, 8), (40, 10), (257, 3)])
def test_layout_keys_values_and_masks(length, num_pairs):
    task = MQAR(length, num_pairs, seed=3)
    half = task.vocab_size // 2
    for i in range(50):
        ex = task[i]
        tokens, loss, answer = ex["tokens"], ex["loss_mask"], ex["answer_mask"]
        assert tokens.shape == (length + 1,) and loss.shape == answer.shape == (length,)
        keys, values = tokens[0 : 2 * num_pairs : 2], tokens[1 : 2 * num_pairs : 2]
        # disjoint halves of the vocabulary, distinct within the example
        assert np.all((keys >= 1) & (keys < half)) and np.all((values >= half) & (values < task.vocab_size))
        assert len(set(keys)) == num_pairs and len(set(values)) == num_pairs
        # the loss is on the recalled values only: one per key, at query positions after the pairs
        np.testing.assert_array_equal(loss, answer)
        assert set(np.unique(loss)) <= {0.0, 1.0}
        at, _ = _queries(task, ex)
        assert len(at) == num_pairs and np.all(at >= 2 * num_pairs) and np.all((at - 2 * num_pairs) % 2 == 0)
        # each query is a key and its target (the next token) is that key's value
        lookup = dict(zip(keys.tolist(), values.tolist()))
        assert sorted(tokens[at].tolist()) == sorted(keys.tolist())
        assert all(tokens[t + 1] == lookup[int(tokens[t])] for t in at)


def test_gaps_follow_the_power_law():
    # one pair: the single gap is drawn from p(g) exactly (no sampling without replacement)
    task = MQAR(64, 1, power_a=0.3, seed=0)
    p = task.gap_probabilities()
    g = np.arange(1, len(p) + 1, dtype=np.float64)
    np.testing.assert_allclose(p, g ** (0.3 - 1.0) / np.sum(g ** (0.3 - 1.0)))
    assert np.all(np.diff(p) < 0)  # near gaps are the likelier ones
    n = 6000
    gaps = np.array([_queries(task, task[i])[1][0] for i in range(n)])
    freq = np.bincount(gaps, minlength=len(p)) / n
    assert np.max(np.abs(freq - p)) < 0.02  # binomial sd at p=0.15, n=6000 is ~0.005
    # a = 1 is the uniform law
    np.testing.assert_allclose(MQAR(64, 2, power_a=1.0).gap_probabilities(), 1 / 30)


def test_zoology_default_puts_most_queries_near_the_pairs():
    task = MQAR(256, 16, seed=1)  # power_a 0.01, Zoology's default
    gaps = np.concatenate([_queries(task, task[i])[1] for i in range(200)])
    space = (256 - 32) // 2
    assert np.median(gaps) < space / 4 and gaps.max() > space / 2


def test_deterministic_in_seed_and_index():
    a, b, c = MQAR(128, 8, seed=5), MQAR(128, 8, seed=5), MQAR(128, 8, seed=6)
    for i in (0, 1, 77):
        for key in ("tokens", "loss_mask", "answer_mask"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])
    assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(length=64, num_pairs=0), "num_pairs"),
        (dict(length=64, num_pairs=128), "num_pairs"),
        (dict(length=15, num_pairs=4), "too short"),
        (dict(length=64, num_pairs=4, power_a=0.0), "power_a"),
        (dict(length=64, num_pairs=4, power_a=1.5), "power_a"),
    ],
)
def test_bad_sizes_are_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MQAR(**kwargs)


def test_pipeline_source_mqar():
    data = data_config(source="mqar", seq_len=64, num_pairs=4, power_a=0.2, batch_size=8)
    train, val = example_source(data, "train", 64), example_source(data, "validation", 64)
    assert isinstance(train, MQAR) and (train.num_pairs, train.power_a) == (4, 0.2)
    assert train.seed != val.seed  # held-out examples
    batch = next(iter(FixedLengthBatches(data, "train")))
    assert batch["inputs"].shape == (8, 64)
    np.testing.assert_array_equal(batch["loss_mask"], batch["answer_mask"])
    np.testing.assert_array_equal(batch["loss_mask"].sum(1), 4)
    np.testing.assert_array_equal(batch["targets"][0], train[0]["tokens"][1:])
