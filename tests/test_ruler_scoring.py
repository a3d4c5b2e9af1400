"""`zoo.eval.ruler_scoring`: the RULER-style tasks scored through a zoo model by greedy decoding.
A tiny random model runs every task and scores in [0, 1], far from the oracle's 1.0 and within a
loose band of chance; the batched scorer gives what `ruler.score` gives with the one-prompt predictor;
its answers are `zoo.generate`'s greedy tokens."""

import numpy as np
import pytest

import zoo
from zoo.data import ruler
from zoo.eval.ruler_scoring import answer_length, greedy_answers, model_predictor, ruler_report, score_model

LENGTH = 128


@pytest.fixture(scope="module")
def model():
    return zoo.create_model("transformer", "tiny", seed=6, n_layers=1)


def test_every_task_runs_through_a_random_model_near_chance(model):
    report = ruler_report(model, [LENGTH], n=6, batch_size=6)
    assert set(report) == set(ruler.TASKS)
    for name, by_length in report.items():
        r = by_length[LENGTH]
        task = ruler.TASKS[name](LENGTH, seed=0)
        assert 0.0 <= r["exact_match"] <= r["token_accuracy"] <= 1.0, (name, r)
        assert r["chance"] == ruler.chance(task)
        assert r["exact_match"] == 0.0 and r["token_accuracy"] <= 0.25, (name, r)  # random weights: near chance
        assert ruler.score(task, task.solve, 6) == {"exact_match": 1.0, "token_accuracy": 1.0}  # the oracle


def test_batched_answers_are_the_one_prompt_predictors_and_score_reads_them(model):
    task = ruler.MultiKeyNeedle(LENGTH, seed=2)
    k = answer_length(task)
    predict = model_predictor(model, k)
    answers = greedy_answers(model, task, n=6, batch_size=6)  # the report's batch shape: compiled already
    assert answers.shape == (6, k)
    for i in range(3):
        np.testing.assert_array_equal(answers[i], predict(task[i]["tokens"][:-k]))
    batched = score_model(model, task, n=6, batch_size=6)
    assert {key: batched[key] for key in ("exact_match", "token_accuracy")} == ruler.score(task, predict, 6)
    # score reads the answers in example order: the stored answers in their place score 1.0
    truth = iter([task[i]["tokens"][-k:] for i in range(3)])
    assert ruler.score(task, lambda prompt: next(truth), 3)["exact_match"] == 1.0


def test_a_vocabulary_below_256_is_a_value_error():
    small = zoo.create_model("transformer", "tiny", seed=0, n_layers=1, vocab_size=64)
    with pytest.raises(ValueError, match="vocab_size is 64"):
        model_predictor(small)
    with pytest.raises(ValueError, match="unknown RULER tasks"):
        ruler_report(zoo.create_model("transformer", "tiny", seed=0, n_layers=1), [LENGTH], 2, tasks=["ruler_x"])
