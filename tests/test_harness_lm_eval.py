"""`ZooLM` inside a real lm-evaluation-harness: a local multiple-choice task and a local generation
task (YAML + JSONL written here, nothing downloaded), run through `python -m zoo.eval.harness` (lm-eval's
own command line with the "zoo" model registered) and through `lm_eval.simple_evaluate`.

The multiple-choice accuracy equals the one computed from `ZooLM.loglikelihood` by hand, the
generations equal `zoo.generate` of each prompt alone (greedy, cut at the stop string; a prompt longer
than max_length - max_gen_toks by its last tokens, as documented), and model_args' batch_size beside
the command line's --batch_size is accepted."""

import json
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra (pip install 'longcontext-zoo[lm-eval]')")

import zoo  # noqa: E402
from zoo.data.tokenizers import ByteTokenizer  # noqa: E402
from zoo.eval import harness  # noqa: E402
from zoo.model_dir import save_pretrained  # noqa: E402

WORDS = ["reds", "blue", "cats", "dogs", "suns", "moon", "tree", "leaf"]  # one length: prompts of two lengths


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny transformer model directory with the byte tokenizer, and two local tasks of 20 rows."""
    root = tmp_path_factory.mktemp("lm_eval")
    model = zoo.create_model("transformer", "tiny", seed=5, n_layers=1)
    save_pretrained(model, root / "model", tokenizer=ByteTokenizer().spec())
    rng = np.random.default_rng(0)
    mc, gen = [], []
    for i in range(20):
        words = [str(w) for w in rng.choice(WORDS, 2 + 3 * (i % 2))]  # 2 or 5 words: few compilations
        mc.append(
            {"question": f"Q{i}: " + " ".join(words) + " ->", "choices": [" yes", " no", " maybe"], "answer": i % 3}
        )
        prompt = f"row {i:02d}: " + " ".join(words)
        gen.append({"prompt": prompt * (3 if i == 19 else 1), "target": "x"})  # row 19: longer than 48 - 6
    for name, rows in (("mc", mc), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "tasks").mkdir()
    (root / "tasks" / "zoo_mc.yaml").write_text(
        "task: zoo_mc\n"
        + data.format(path=root / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (root / "tasks" / "zoo_gen.yaml").write_text(
        "task: zoo_gen\n"
        + data.format(path=root / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    # the accuracy from ZooLM.loglikelihood by hand
    lm = harness.ZooLM(pretrained=str(root / "model"), batch_size=4)
    scores = np.array([lp for lp, _ in lm.loglikelihood([(r["question"], c) for r in mc for c in r["choices"]])])
    acc = float(np.mean(scores.reshape(len(mc), 3).argmax(1) == np.array([r["answer"] for r in mc])))
    return root, acc, gen


def test_simple_evaluate_with_local_tasks(setup, monkeypatch):
    root, acc, gen = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="zoo",
        model_args={
            "pretrained": str(root / "model"),
            "batch_size": 4,
            "max_length": 48,
        },  # a dict: create_from_arg_obj
        tasks=["zoo_mc", "zoo_gen"],
        task_manager=TaskManager(include_path=str(root / "tasks")),
        batch_size=8,
        log_samples=True,
    )
    assert results["results"]["zoo_mc"]["acc,none"] == pytest.approx(acc)
    model, _ = zoo.from_pretrained(str(root / "model"))
    tok = ByteTokenizer()
    samples = sorted(results["samples"]["zoo_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == 20
    assert (
        len(tok.encode(samples[19]["doc"]["prompt"]))
        > 48 - 6
        > max(len(tok.encode(s["doc"]["prompt"])) for s in samples[:19])
    )
    for s in samples:
        ids = tok.encode(s["doc"]["prompt"]).tolist()[-(48 - 6) :]  # the context is cut to max_length - max_gen_toks
        alone = zoo.generate(model, [ids], 6, eos=tok.eos_id).rows()[0]
        text = tok.decode([t for t in alone if t != tok.eos_id]).split("\n")[0]
        assert s["resps"][0][0] == text, s["doc_id"]


def test_the_command_line_wrapper(setup, tmp_path, monkeypatch):
    root, acc, _ = setup
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = [
        "--model", "zoo",
        "--model_args", f"pretrained={root / 'model'},batch_size=4",  # beside --batch_size: no clash
        "--tasks", "zoo_mc",
        "--include_path", str(root / "tasks"),
        "--batch_size", "8",
        "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    assert harness.main(argv) == 0
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.endswith(".json")]
    (file,) = files
    with open(file) as f:
        out = json.load(f)
    assert out["results"]["zoo_mc"]["acc,none"] == pytest.approx(acc)
    assert out["config"]["model"] == "zoo"
