"""AdamW with warmup + cosine decay over tokens, global-norm clipping and parameter groups.

Groups come from parameter metadata: `wd=False` (norm scales, biases, and the SSM parameters the
papers exempt) gets no weight decay; `lr_group="ssm"` gets `optim.ssm_lr` instead of `optim.lr`
(S4's A, B, dt), also without weight decay.
"""

from __future__ import annotations

from typing import Any

import optax


def lr_schedule(peak: float, warmup_tokens: int, total_tokens: int, min_ratio: float, tokens_per_step: int):
    """Linear warmup then cosine decay to `min_ratio * peak`, as a function of tokens seen.

    The optax step count is converted to tokens, so the schedule is the same whatever the sequence
    length of each step (dataset decomposition keeps tokens per step constant).
    """
    warmup_tokens = max(int(warmup_tokens), 1)
    base = optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_tokens, max(total_tokens, warmup_tokens + 1), peak * min_ratio
    )
    return lambda count: base(count * tokens_per_step)


def make_optimizer(optim: Any, total_steps: int, tokens_per_step: int, labels: dict[str, str]):
    """optax chain: clip by global norm -> AdamW per group ('decay', 'no_decay', 'ssm').

    Args:
      optim: the `optim` section of the run config.
      total_steps: steps of the run; with tokens_per_step it sets the schedule length in tokens.
      labels: the group of every parameter, keyed like the parameter dict.
    """
    total_tokens = total_steps * tokens_per_step
    warmup = optim.warmup_steps * tokens_per_step

    def adamw(peak, wd):
        return optax.adamw(
            lr_schedule(peak, warmup, total_tokens, optim.min_lr_ratio, tokens_per_step),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=wd,
        )

    groups = {
        "decay": adamw(optim.lr, optim.weight_decay),
        "no_decay": adamw(optim.lr, 0.0),
        "ssm": adamw(optim.ssm_lr, 0.0),
    }
    used = {g: t for g, t in groups.items() if g in set(labels.values())}
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), optax.multi_transform(used, labels))


def param_label(metadata: dict[str, Any], ndim: int) -> str:
    """The optimizer group of one parameter from its metadata."""
    if metadata.get("lr_group") == "ssm":
        return "ssm"
    if metadata.get("wd", True) is False or ndim < 2:
        return "no_decay"
    return "decay"
