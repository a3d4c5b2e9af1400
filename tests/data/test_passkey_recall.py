"""The passkey + associative-recall mixture: each example is exactly its component's, the mixing
fraction holds, and the pipeline serves it in decomposition buckets."""

import numpy as np
import pytest
from data_testing import data_config

from zoo.data import synthetic
from zoo.data.pipeline import example_source, make_batches


@pytest.mark.parametrize("length", [128, 300])
def test_each_example_is_its_component_example(length):
    mix = synthetic.PasskeyRecall(length, seed=5, num_pairs=6, num_queries=3)
    passkey = synthetic.Passkey(length, seed=5)
    recall = synthetic.AssociativeRecall(length, 6, 3, seed=5)
    kinds = []
    for i in range(40):
        ex = mix[i]
        ref = recall[i] if mix.is_recall(i) else passkey[i]
        kinds.append(mix.is_recall(i))
        assert ex["tokens"].shape == (length + 1,) and ex["tokens"].dtype == np.int32
        for key in ("tokens", "loss_mask", "answer_mask"):
            np.testing.assert_array_equal(ex[key], ref[key])
    assert 0 < sum(kinds) < len(kinds)  # both tasks occur


def test_recall_fraction_and_answer_only():
    for fraction in (0.0, 0.25, 1.0):
        mix = synthetic.PasskeyRecall(128, seed=1, recall_fraction=fraction)
        share = np.mean([mix.is_recall(i) for i in range(2000)])
        assert abs(share - fraction) < 0.04, (fraction, share)
    mix = synthetic.PasskeyRecall(128, seed=1, recall_fraction=0.0, answer_only=True)
    ex = mix[3]
    np.testing.assert_array_equal(ex["loss_mask"], ex["answer_mask"])
    assert ex["answer_mask"].sum() == synthetic.N_DIGITS


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="recall_fraction"):
        synthetic.PasskeyRecall(128, recall_fraction=1.5)
    with pytest.raises(ValueError, match="too short"):  # passkey needs about 100 tokens
        synthetic.PasskeyRecall(64)
    with pytest.raises(ValueError, match="num_queries"):
        synthetic.PasskeyRecall(128, num_pairs=2, num_queries=3)


def test_pipeline_serves_the_mixture_in_buckets():
    data = data_config(
        source="passkey_recall", mode="decomposition", min_log2=7, max_log2=8, tokens_per_step=1024, seq_len=256
    )
    src = example_source(data, "train", 128)
    assert isinstance(src, synthetic.PasskeyRecall) and src.length == 128
    val = example_source(data, "validation", 128)
    assert val.seed != src.seed  # the validation split draws other examples
    batches = make_batches(data, "train")
    seen = set()
    for _ in range(12):
        b = next(batches)
        t = b["inputs"].shape[1]
        seen.add(t)
        assert b["inputs"].shape == (1024 // t, t) and b["loss_mask"].shape == (1024 // t, t)
        assert b["answer_mask"].sum(1).min() > 0  # every row has answers (digits or recalled values)
    assert seen == {128, 256}
