"""Training: the loss (DESIGN fact 15) and its gradients.

The training signal is prompt + answer + eos, labels -100 on the prompt (``preprocess.build_inputs(...,
answer=...)`` makes them), and the mean next-token cross-entropy over the labelled positions: position
i's logits predict label i+1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cogvlm_jax.model import CogVLM
from cogvlm_jax.preprocess import IGNORE_INDEX as IGNORE  # label of a position not trained on


def next_token_loss(logits, labels):
    """Mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` over labelled positions.

    logits: float [B, L, V]; labels: int [B, L] with ``IGNORE`` where there is nothing to learn.
    Returns (loss, number of labelled tokens). The log-softmax is taken in float32.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    count = keep.sum()
    loss = -jnp.where(keep, picked, 0.0).sum() / jnp.maximum(count, 1)
    return loss, count


def loss_fn(module: CogVLM, params, batch):
    """The training loss of ``batch`` (a dict with input_ids, token_type_ids, attention_mask, labels and,
    if there are images, pixel_values) under ``params``. Returns (loss, number of labelled tokens)."""
    logits, _, _ = module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                                batch["attention_mask"], batch.get("pixel_values"))
    return next_token_loss(logits, batch["labels"])
