"""Mamba-2 on MQAR: the zoo's model and Hugging Face's Mamba2ForCausalLM trained by one loop.

    python scripts/mamba2_mqar_parity.py --check                       # same weights: loss and grads
    python scripts/mamba2_mqar_parity.py --run zoo --steps 1000        # train one model, write JSON
    python scripts/mamba2_mqar_parity.py --run hf --steps 1000 --init zoo
    python scripts/mamba2_mqar_parity.py --table                       # Markdown table of the JSONs

Both models get the same configuration (2 layers, d_model 64, d_state 32, headdim 16, expand 2,
1 group, conv 4, chunk 64, gated RMSNorm, tied embeddings, vocabulary 256), the same batches of
`zoo.data.synthetic.MQAR` (or the older `AssociativeRecall` with `--task recall`: pairs first, the
queries at the end), the same AdamW (betas 0.9/0.999, eps 1e-8, global-norm clipping, linear warmup
then cosine decay) with the parameter groups of mamba_ssm (no weight decay on A_log, dt_bias, D,
norms and biases), and the same held-out evaluation: accuracy on the recalled values, overall and
by the distance from the query back to its key-value pair.

`--init zoo` starts Hugging Face's model from the zoo's initial weights (converted with
`zoo.convert.pretrained.export_tensors`), so the two runs differ only in their forward/backward
implementations (float32 rounding); `--init native` keeps transformers' own initialisation
(A = 1..H per head, N(0, 0.1) linear and embedding weights) for comparison. `--check` compares the
loss and every parameter's gradient on one batch from identical weights, then the losses of the
first optimizer steps.

torch and transformers are imported only for the Hugging Face runs and `--check` (they are not
dependencies of the zoo). Results go to --out (one JSON per run, rewritten at every evaluation, with
the zoo version, git commit, date, CPU, library versions and wall time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_DECAY = ("A_log", "dt_bias", "D")  # mamba_ssm's _no_weight_decay parameters


# ------------------------------------------------------------------------------------------ shared


def model_fields(args) -> dict:
    return dict(
        vocab_size=256,
        d_model=args.d_model,
        n_layers=2,
        d_state=args.d_state,
        headdim=16,
        expand=2,
        ngroups=1,
        d_conv=4,
        chunk_size=64,
        tie_embeddings=True,
        implementation="xla",
    )


def model_config(args):
    from zoo.models import registry

    return registry.get_model_config("mamba2", "tiny", **model_fields(args))


def make_task(args, seed):
    from zoo.data.synthetic import MQAR, AssociativeRecall

    if args.task == "mqar":
        return MQAR(length=args.length, num_pairs=args.pairs, seed=seed)
    return AssociativeRecall(args.length, num_pairs=args.pairs, num_queries=args.pairs, seed=seed)


def batch_at(task, start, size):
    items = [task[j] for j in range(start, start + size)]
    tokens = np.stack([it["tokens"] for it in items])
    return tokens[:, :-1], tokens[:, 1:], np.stack([it["answer_mask"] for it in items])


def query_distance(inputs, mask):
    """Distance from each answered position back to the first occurrence of its key (the pair)."""
    rows, cols = np.nonzero(mask)
    keys = inputs[rows, cols]
    first = np.argmax(inputs[rows] == keys[:, None], axis=1)
    return rows, cols, cols - first


def lr_at(step, args):
    """Linear warmup to --lr, then cosine decay to 0.1 --lr at --steps (the same for both models)."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))


def decays(name: str, ndim: int) -> bool:
    return ndim >= 2 and name.split("/")[-1].split(".")[-1] not in NO_DECAY


BINS = (0, 8, 16, 32, 64)  # distance bins [lo, hi)


def accuracy(logits_fn, eval_data):
    inputs, targets, mask = eval_data
    hits, dist = [], []
    for s in range(0, len(inputs), 128):
        sl = slice(s, s + 128)
        pred = np.argmax(logits_fn(inputs[sl]), -1)
        rows, cols, d = query_distance(inputs[sl], mask[sl])
        hits.append(pred[rows, cols] == targets[sl][rows, cols])
        dist.append(d)
    hits, dist = np.concatenate(hits), np.concatenate(dist)
    by_dist = {}
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (dist >= lo) & (dist < hi)
        if sel.any():
            by_dist[f"{lo}-{hi - 1}"] = [round(float(hits[sel].mean()), 4), int(sel.sum())]
    return float(hits.mean()), by_dist


def provenance(args) -> dict:
    import jax

    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import zoo

    out = {
        "zoo_version": zoo.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "argv": sys.argv[1:],
    }
    if args.run == "hf" or args.check:
        import torch
        import transformers

        out.update(torch=torch.__version__, transformers=transformers.__version__)
    return out


# ------------------------------------------------------------------------------------------ models


class ZooRunner:
    """The zoo's Mamba2 through the public API, trained with optax on a flat parameter dict."""

    def __init__(self, args):
        import jax
        import jax.numpy as jnp
        import optax

        import zoo
        from zoo.models.params import ParamView

        self.model = zoo.create_model("mamba2", "tiny", seed=args.seed, **model_fields(args))
        self.view = ParamView(self.model)
        self.params = self.view.flat(self.model)
        mask = {n: decays(n, p.ndim) for n, p in self.params.items()}
        self.opt = optax.chain(
            optax.clip_by_global_norm(args.clip),
            optax.adamw(lambda c: lr_at_jnp(c, args), b1=0.9, b2=0.999, eps=1e-8, weight_decay=args.wd, mask=mask),
        )
        self.opt_state = self.opt.init(self.params)
        view = self.view

        def loss_fn(params, inputs, targets, mask):
            logits = view.merge(params)(inputs)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            return jnp.sum(ce * mask) / jnp.sum(mask)

        self.loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))

        @jax.jit
        def step(params, opt_state, inputs, targets, mask):
            loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets, mask)
            updates, opt_state = self.opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = step
        self._logits = jax.jit(lambda params, inputs: view.merge(params)(inputs))

    def step(self, inputs, targets, mask):
        self.params, self.opt_state, loss = self._step(self.params, self.opt_state, inputs, targets, mask)
        return float(loss)

    def logits(self, inputs):
        return np.asarray(self._logits(self.params, inputs))

    def model_now(self):
        return self.view.merge(self.params)


def lr_at_jnp(count, args):
    import jax.numpy as jnp

    warm = args.lr * count / args.warmup
    frac = jnp.clip((count - args.warmup) / max(1, args.steps - args.warmup), 0.0, 1.0)
    cos = args.lr * (0.1 + 0.9 * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
    return jnp.where(count < args.warmup, warm, cos)


class HFRunner:
    """transformers' Mamba2ForCausalLM (its pure-PyTorch path on CPU), trained with torch's AdamW."""

    def __init__(self, args, zoo_model=None):
        import torch
        from transformers import Mamba2Config, Mamba2ForCausalLM

        from zoo.convert.hf import export_mamba2_config
        from zoo.convert.pretrained import export_tensors

        self.torch = torch
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        fields = export_mamba2_config(model_config(args), dtype="float32", special={})
        fields = {k: v for k, v in fields.items() if k not in ("architectures", "model_type", "torch_dtype")}
        self.model = Mamba2ForCausalLM(Mamba2Config(**{**fields, "use_cache": False})).float()
        if zoo_model is not None:
            tensors, _ = export_tensors(zoo_model)
            missing, unexpected = self.model.load_state_dict(
                {k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=False
            )
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise RuntimeError(f"weight transfer: missing {missing}, unexpected {unexpected}")
        assert self.model.lm_head.weight.data_ptr() == self.model.backbone.embeddings.weight.data_ptr()
        named = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in named if decays(n, p.ndim)], "weight_decay": args.wd},
            {"params": [p for n, p in named if not decays(n, p.ndim)], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_at(s, args) / args.lr)
        self.clip = args.clip
        self.model.train()

    def loss(self, inputs, targets, mask):
        t = self.torch
        logits = self.model(input_ids=t.from_numpy(np.asarray(inputs, np.int64))).logits
        ce = t.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            t.from_numpy(np.asarray(targets, np.int64)).reshape(-1),
            reduction="none",
        )
        m = t.from_numpy(np.asarray(mask, np.float32)).reshape(-1)
        return (ce * m).sum() / m.sum()

    def step(self, inputs, targets, mask):
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(inputs, targets, mask)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        return float(loss)

    def logits(self, inputs):
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.from_numpy(np.asarray(inputs, np.int64))).logits.float().numpy()


# ------------------------------------------------------------------------------------------ modes


def ssd_gradient_check(args) -> dict:
    """The chunked SSD's gradients (the zoo's CPU path) against the sequential recurrence's, at the
    training shapes (batch, T, 8 heads of 16, d_state, chunk 64), relative max difference per input."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.ssd import ssd

    cfg = model_config(args)
    b, t, h, p, n = args.batch, args.length, cfg.n_heads, cfg.headdim, cfg.d_state
    k = jax.random.split(jax.random.PRNGKey(args.seed), 7)
    x = jax.random.normal(k[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 3.0)
    A = -jax.random.uniform(k[2], (h,), minval=1.0, maxval=16.0)
    B, C = (jax.random.normal(kk, (b, t, 1, n)) for kk in k[3:5])
    D, w = jnp.ones((h,)), jax.random.normal(k[5], (b, t, h, p))

    def grads(impl):
        def f(*a):
            return jnp.sum(ssd(*a[:5], chunk_size=cfg.chunk_size, D=a[5], implementation=impl) * w)

        return jax.jit(jax.grad(f, argnums=tuple(range(6))))(x, dt, A, B, C, D)

    ref, chunked = grads("reference"), grads("xla")
    return {
        name: float(jnp.max(jnp.abs(r - c)) / jnp.max(jnp.abs(r)))
        for name, r, c in zip(("x", "dt", "A", "B", "C", "D"), ref, chunked)
    }


def check(args) -> dict:
    """Identical weights: loss and per-parameter gradients on one batch, then the first steps' losses."""
    from zoo.convert.hf import mamba2_table, to_zoo

    zoo_run = ZooRunner(args)
    hf_run = HFRunner(args, zoo_model=zoo_run.model)
    task = make_task(args, args.seed)
    inputs, targets, mask = batch_at(task, 0, args.batch)
    loss_z, grads_z = zoo_run.loss_and_grad(zoo_run.params, inputs, targets, mask)
    hf_run.opt.zero_grad(set_to_none=True)
    loss_h = hf_run.loss(inputs, targets, mask)
    loss_h.backward()
    hf_grads = {n: p.grad.numpy() for n, p in hf_run.model.named_parameters()}
    grads = {}
    for key, name, layout in mamba2_table(model_config(args)):
        gz = np.asarray(grads_z[name])
        gh = to_zoo(hf_grads[key], layout)
        grads[name] = {
            "rel_max_diff": float(np.max(np.abs(gz - gh)) / max(np.max(np.abs(gz)), 1e-30)),
            "grad_norm_zoo": float(np.linalg.norm(gz)),
            "grad_norm_hf": float(np.linalg.norm(gh)),
        }
    hf_run.opt.zero_grad(set_to_none=True)
    steps = []
    for s in range(args.check_steps):
        batch = batch_at(task, s * args.batch, args.batch)
        steps.append([s, zoo_run.step(*batch), hf_run.step(*batch)])
    return {
        "ssd_grad_rel_diff": ssd_gradient_check(args),
        "loss_zoo": float(loss_z),
        "loss_hf": float(loss_h),
        "grads": grads,
        "max_rel_grad_diff": max(g["rel_max_diff"] for g in grads.values()),
        "steps": {"columns": ["step", "loss_zoo", "loss_hf"], "rows": steps},
    }


def train(args, out_path) -> dict:
    zoo_run = ZooRunner(args) if args.run == "zoo" or args.init == "zoo" else None
    if args.run == "zoo":
        runner = zoo_run
    else:
        runner = HFRunner(args, zoo_model=zoo_run.model if args.init == "zoo" else None)
    task = make_task(args, args.seed)
    eval_data = batch_at(make_task(args, args.seed + 1000), 0, args.eval_examples)
    result = {"args": vars(args), "provenance": provenance(args), "curve": [], "losses": []}
    start = time.time()
    losses = []
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc, by_dist = accuracy(runner.logits, eval_data)
            mean_loss = float(np.mean(losses[-args.eval_every :])) if losses else None
            result["curve"].append(
                {"step": step, "acc": round(acc, 4), "acc_by_distance": by_dist, "train_loss": mean_loss}
            )
            result["wall_s"] = round(time.time() - start, 1)
            result["final_acc"] = round(acc, 4)
            result["losses"] = [round(v, 4) for v in losses]
            write_json(out_path, result)
            print(f"step {step}: acc {acc:.3f} loss {mean_loss} {by_dist} ({result['wall_s']} s)", flush=True)
        if step == args.steps:
            break
        losses.append(runner.step(*batch_at(task, step * args.batch, args.batch)))
    return result


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def run_name(args) -> str:
    name = f"{args.run}" + (f"_init-{args.init}" if args.run == "hf" else "")
    return f"{name}_{args.task}_lr{args.lr:g}_wd{args.wd:g}_s{args.seed}_{args.steps}"


def load_results(out_dir) -> tuple[list[dict], list[dict]]:
    """(training runs, checks) of the JSONs in out_dir, sorted by file name."""
    runs, checks = [], []
    for fname in sorted(os.listdir(out_dir)):
        if fname.endswith(".json"):
            with open(os.path.join(out_dir, fname)) as f:
                (checks if fname.startswith("check") else runs).append(json.load(f))
    return runs, checks


def run_label(r: dict) -> str:
    a = r["args"]
    return ("zoo" if a["run"] == "zoo" else f"transformers (init {a['init']})") + f", seed {a['seed']}"


def table(out_dir) -> str:
    """Markdown tables of every JSON in out_dir: the parity checks, then the training runs."""
    runs, checks = load_results(out_dir)
    lines = [
        "| task | loss zoo | loss transformers | max relative gradient difference | "
        "largest loss difference in the first steps | SSD gradient, chunked vs sequential |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        rows = c["steps"]["rows"]
        diff = max(abs(z - h) for _, z, h in rows)
        lines.append(
            f"| {c['args']['task']} | {c['loss_zoo']:.6f} | {c['loss_hf']:.6f} | {c['max_rel_grad_diff']:.1e} | "
            f"{diff:.1e} ({len(rows)} steps) | {max(c['ssd_grad_rel_diff'].values()):.1e} |"
        )
    lines += [
        "",
        "| model | task | lr | wd | steps run / scheduled | held-out acc | acc by query-to-pair distance "
        "(tokens) | train loss (last 100 steps) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        a, last = r["args"], r["curve"][-1]
        by = ", ".join(f"{k}: {v[0]:.2f}" for k, v in last["acc_by_distance"].items())
        model = run_label(r)
        lines.append(
            f"| {model} | {a['task']} | {a['lr']:g} | {a['wd']:g} | {last['step']} / {a['steps']} | "
            f"{last['acc']:.3f} | {by} | {np.mean(r['losses'][-100:]):.3f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def curves(out_dir) -> str:
    """Held-out accuracy of every run at every evaluation, one column per run."""
    runs, _ = load_results(out_dir)
    steps = sorted({p["step"] for r in runs for p in r["curve"]})
    names = [f"{run_label(r)}, {r['args']['task']}" for r in runs]
    lines = ["| step | " + " | ".join(names) + " |", "|---" * (len(runs) + 1) + "|"]
    for s in steps:
        cells = []
        for r in runs:
            hit = [p["acc"] for p in r["curve"] if p["step"] == s]
            cells.append(f"{hit[0]:.3f}" if hit else "")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run", choices=["zoo", "hf"], default="zoo", help="which model to train")
    p.add_argument("--init", choices=["zoo", "native"], default="zoo", help="hf: start from the zoo's init or HF's")
    p.add_argument("--check", action="store_true", help="compare loss and gradients from identical weights")
    p.add_argument("--table", action="store_true", help="print a Markdown table of the JSONs in --out")
    p.add_argument("--task", choices=["mqar", "recall"], default="mqar")
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--check-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    p.add_argument("--out", default=os.path.join(REPO, "results", "mamba2_mqar"))
    args = p.parse_args(argv)
    if args.table:
        print(table(args.out) + "\n\n" + curves(args.out))
        return
    os.makedirs(args.out, exist_ok=True)
    if args.check:
        start = time.time()
        res = {"args": vars(args), "provenance": provenance(args), **check(args)}
        res["wall_s"] = round(time.time() - start, 1)
        write_json(os.path.join(args.out, f"check_{args.task}_s{args.seed}.json"), res)
        print(json.dumps({k: v for k, v in res.items() if k not in ("grads", "args", "provenance")}, indent=1))
        return
    train(args, os.path.join(args.out, run_name(args) + ".json"))


if __name__ == "__main__":
    main()
