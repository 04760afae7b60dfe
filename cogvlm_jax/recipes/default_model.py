"""The shipped default model: a small CogVLM2-style model trained from scratch on ``cogvlm_jax.recipes.synthetic``.

    python -m cogvlm_jax.recipes.default_model --out cogvlm_jax/default_model --overwrite

(the shipped model: these defaults, seed 0, 1700 steps; ``training.json`` beside it records the run)

Steps: train a byte-level BPE tokenizer on the task's text (pad, bos, eos and the image placeholder are
ids 0-3); build the config (CogVLM2's GQA and 2x2 conv downsample, small sizes, that vocabulary, its
own ``image_token_id``); train every parameter from a random init with AdamW (warmup + cosine) on
freshly generated batches, using ``cogvlm_jax.training.trainer.loss_fn``; score exact match on questions from a
different seed through batched ``Model.generate``; write an HF-format checkpoint (safetensors +
config.json + generation_config.json + tokenizer), an example picture and ``training.json`` (command,
seed, wall time, accuracy), atomically.

Why the recipe is what it is (the training runs behind each choice: docs/default-model.md):
- patches of 7 pixels (6 x 6 image tokens): patches of 14 (3 x 3 tokens) cost a quarter per step but
  learn shapes far more slowly.
- one question per picture (``--turns 1``): with several, only part of the labelled answers end in eos,
  and the model runs on past its answer.
- a curriculum (``STAGES``): mixed with the other kinds from the first step, shape learning stalls; after
  a shape-only stage, colour and count follow within a few hundred mixed steps. A where-heavy stage
  lifts "where" and the other kinds recover from it by the end.
- the ViT's position table starts as a 2-D sine-cosine table (``sincos_2d``): with random position
  embeddings "where" stays at its "center" prior.
- one object per picture (``MAX_SHAPES``): two or three are far from learned at this size.
- init for this small width (``scaled_init``); a learning rate of 3e-3 breaks shape learning.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from cogvlm_jax.api import Model
from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.convert_hf import write_hf_checkpoint
from cogvlm_jax.inputs.preprocess import ANSWER_PROMPTS, IGNORE_INDEX, build_inputs, build_prompt, pad_batch
from cogvlm_jax.inputs.tokenizer import load_tokenizer
from cogvlm_jax.models.cogvlm import init_params
from cogvlm_jax.recipes import synthetic
from cogvlm_jax.training.trainer import TrainConfig, Trainer

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|image|>")  # ids 0, 1, 2, 3
TOKENIZER_VOCAB = 512  # an upper bound: the task's words all become single tokens well below it
EVAL_SEED_OFFSET = 1_000_003  # questions scored during training come from seed + this, never trained on

MAX_SHAPES = 1  # objects per picture the shipped model is trained and scored on (the generator draws up to 3)
# The curriculum: (steps, question-kind weights) stages, then ``KIND_WEIGHTS`` for the remaining steps.
# Shape alone first (mixed with the other kinds from the start it stalls), then all kinds (colour and
# count follow within 300 steps; "where", weighted most, is the last to leave its "center" prior), a
# where-heavy stage, and all kinds again to the end. docs/default-model.md has the runs behind it.
KIND_WEIGHTS = {"color": 0.3, "shape": 0.2, "count": 0.1, "where": 0.4}
STAGES = ((300, {"shape": 1.0}), (300, KIND_WEIGHTS), (200, {"color": 0.1, "shape": 0.1, "count": 0.1, "where": 0.7}))

# Sizes (docs/default-model.md says why these). 84 / 7 = 12 x 12 patches, 6 x 6 image tokens after the
# 2x2 conv. Patches of 14 (3 x 3 tokens) are 4x cheaper per step but learn shapes far more slowly.
VISION = {"hidden_size": 96, "intermediate_size": 256, "num_heads": 4, "num_hidden_layers": 3,
          "image_size": 84, "patch_size": 7}
TEXT = {"hidden_size": 128, "intermediate_size": 320, "num_attention_heads": 4, "num_multi_query_heads": 2,
        "num_hidden_layers": 3, "max_position_embeddings": 256}


# ------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(out_dir: str) -> str:
    """Byte-level BPE trained on ``synthetic.corpus()``; writes tokenizer.json + tokenizer_config.json."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(synthetic.corpus()), trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"special token {s} got id {tok.token_to_id(s)}, expected {i}")
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    pad, bos, eos, image = SPECIAL_TOKENS
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
                   "pad_token": pad, "additional_special_tokens": [image],
                   "clean_up_tokenization_spaces": False}, f, indent=2)
    return out_dir


# ---------------------------------------------------------------------------------------- config
def make_config(tokenizer):
    """The model config: CogVLM2 family, our sizes, the tokenizer's vocabulary and special ids."""

    ids = {name: tokenizer.token_to_id(tok) for name, tok in zip(("pad", "bos", "eos", "image"), SPECIAL_TOKENS)}
    v = VISION
    d = {
        "_name_or_path": "cogvlm-jax-shapes", "architectures": ["CogVLMForCausalLM"], "cogvlm_family": "cogvlm2",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"],
        "image_token_id": ids["image"], "hidden_act": "silu", "rms_norm_eps": 1e-5, "template_version": "chat",
        "torch_dtype": "float32", "vocab_size": tokenizer.vocab_size, **TEXT,
        "vision_config": {**v, "hidden_act": "gelu", "in_channels": 3, "layer_norm_eps": 1e-6, "dropout_prob": 0.0,
                          "num_positions": (v["image_size"] // v["patch_size"]) ** 2 + 1},
    }
    return CogVLMConfig.from_hf_dict(d)


# ------------------------------------------------------------------------------------------ data
def encode(tokenizer, config, e: synthetic.Example, with_answer: bool = True) -> dict:
    """``build_inputs`` of the example; with the answer, the history's answers are labelled too.

    One picture then teaches every answer of its conversation (the ViT runs once for several labelled
    answers) and the model learns the multi-turn chat layout. History answers are labelled without the
    newline after them; the last answer with its eos, as ``build_inputs`` labels it.
    """

    x = build_inputs(tokenizer, config, e.query, e.history, image=synthetic.render(e.scene),
                     answer=e.answer if with_answer else None)
    if not with_answer or not e.history:
        return x
    ask = ANSWER_PROMPTS[config.template_version]
    pos = 1 + config.num_image_tokens
    for q, a in e.history:
        for text, labelled in ((f"Question: {q} {ask}", False), (f" {a}", True), ("\n", False)):
            ids = tokenizer.encode(text)
            if list(x["input_ids"][pos:pos + len(ids)]) != ids:
                raise ValueError(f"the history of {e.query!r} does not tokenize piece by piece")
            if labelled:
                assert (x["labels"][pos:pos + len(ids)] == IGNORE_INDEX).all()
                x["labels"][pos:pos + len(ids)] = ids
            pos += len(ids)
    return x


def sequence_length(tokenizer, config, turns: int) -> int:
    """A fixed training length (one compile) that fits ``turns`` of the longest question and answer."""

    q = max(synthetic.all_questions(), key=lambda q: len(tokenizer.encode(q)))
    a = max(synthetic.all_answers(), key=lambda a: len(tokenizer.encode(a)))
    prompt = tokenizer.encode(build_prompt(q, [(q, a)] * (turns - 1), config.template_version))
    # + 4: BPE merges across a word boundary can make a prompt a token or two longer than its pieces
    n = 1 + config.num_image_tokens + len(prompt) + len(tokenizer.encode(a)) + 1 + 4
    return -(-n // 8) * 8


def question_kind(seed: int, index: int, weights: dict) -> str:
    """The question kind of training example ``index``, drawn with ``weights`` (reproducibly)."""
    rng = np.random.default_rng([seed, index, 7])
    p = np.array([weights.get(k, 0.0) for k in synthetic.QUESTION_KINDS])
    return synthetic.QUESTION_KINDS[int(rng.choice(len(p), p=p / p.sum()))]


def stage_at(step: int) -> dict:
    """The question-kind weights of training step ``step`` (1-based): ``STAGES``, then ``KIND_WEIGHTS``."""
    end = 0
    for n, weights in STAGES:
        end += n
        if step <= end:
            return weights
    return KIND_WEIGHTS


def batches(tokenizer, config, seed: int, batch_size: int, length: int, steps: int, turns: int):
    """Training batches (dicts of numpy arrays), made two ahead in a worker thread."""

    def make(step):
        first = step * batch_size  # example i asks 1 + i % turns questions about its picture
        weights = stage_at(step + 1)
        items = [synthetic.example(seed, i, kind=question_kind(seed, i, weights), turns=1 + i % turns,
                                   max_shapes=MAX_SHAPES) for i in range(first, first + batch_size)]
        return pad_batch([encode(tokenizer, config, e) for e in items], config.pad_token_id, length)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ahead = [pool.submit(make, s) for s in range(min(2, steps))]
        for step in range(steps):
            if step + 2 < steps:
                ahead.append(pool.submit(make, step + 2))
            yield ahead.pop(0).result()


# ----------------------------------------------------------------------------------------- init
def scaled_init(params, key, num_layers: int):
    """Re-draw the weights for training from scratch at this small width.

    ``init_params``' normal(0.02) suits the published 4096-wide model. Here: every linear / conv kernel
    N(0, 1 / fan_in) (decoder linears are stored ``[out, in]``), the token embeddings and boi/eoi N(0, 1)
    so a token's own identity is as strong in the residual stream as what the layers add, and the
    decoder's residual-branch outputs (attention ``dense``, MLP ``down_proj``) shrunk by
    ``1 / sqrt(2 * num_layers)``. With normal(0.02) embeddings under unit-gain layers, the question
    words drown after the first layer and the model stays at the answer prior."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
        names = [getattr(p, "key", str(p)) for p in path]
        decoder_linear = names[0].startswith("layers_")
        if names[-1] == "kernel":
            fan_in = leaf.shape[-1] if decoder_linear else int(np.prod(leaf.shape[:-1]))
            leaf = jax.random.normal(k, leaf.shape, leaf.dtype) / np.sqrt(fan_in)
            if decoder_linear and names[-2] in ("language_expert_dense", "vision_expert_dense", "down_proj"):
                leaf = leaf / np.sqrt(2 * num_layers)
        elif names[-1] in ("embedding", "boi", "eoi"):
            leaf = jax.random.normal(k, leaf.shape, leaf.dtype)
        elif names[-1] == "position_embedding":
            if POSITION_INIT == "sincos":
                leaf = jnp.asarray(sincos_2d(leaf.shape[0] - 1, leaf.shape[-1]) * POSITION_SCALE, leaf.dtype)
            else:  # as strong as the patch signal, so "where" is learnable
                leaf = jax.random.normal(k, leaf.shape, leaf.dtype) / np.sqrt(leaf.shape[-1]) * 4
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


POSITION_INIT = "sincos"
POSITION_SCALE = 1.0


def sincos_2d(num_patches: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """``[1 + num_patches, width]`` 2-D sine-cosine position table (row 0, the CLS slot, is zero): a quarter
    of the channels each for sin(x), cos(x), sin(y), cos(y) at geometric frequencies, so a patch's row and
    column are linear features from the first step."""
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches or width % 4:
        raise ValueError(f"sincos_2d needs a square grid and a width divisible by 4, got {num_patches}, {width}")
    y, x = np.mgrid[:side, :side]
    omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4))
    xs, ys = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    table = np.concatenate([np.sin(xs), np.cos(xs), np.sin(ys), np.cos(ys)], axis=1)
    return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


# ---------------------------------------------------------------------------------------- train
def train(out: str, steps: int, batch_size: int, lr: float, seed: int, eval_every: int, eval_size: int,
          warmup: int, turns: int, log=print, overwrite: bool = False) -> dict:
    started = time.time()
    work = tempfile.mkdtemp(prefix="default-model-")
    try:
        train_tokenizer(work)
        tok = load_tokenizer(work)
        config = make_config(tok)
        length = sequence_length(tok, config, turns)
        init_key, kernel_key = jax.random.split(jax.random.PRNGKey(seed))
        params = scaled_init(init_params(config, init_key), kernel_key, config.text.num_layers)
        n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
        if steps <= sum(n for n, _ in STAGES):
            raise ValueError(f"--steps {steps} leaves no mixed stage after the curriculum {STAGES}")
        log(f"config: vocab {config.text.vocab_size}, {n_params:,} parameters, {config.num_image_tokens} image "
            f"slots, sequence length {length}, batch {batch_size}, {steps} steps, lr {lr}")

        trainer = Trainer(config, TrainConfig(trainable="full", learning_rate=lr, warmup_steps=warmup,
                                              total_steps=steps, end_lr_ratio=0.02, weight_decay=0.01, b2=0.98))
        state, frozen = trainer.init(params, seed)

        evaluator = Model(config, params, tok)
        held_out = synthetic.examples(seed + EVAL_SEED_OFFSET, eval_size, max_shapes=MAX_SHAPES)
        history = []

        def evaluate(step):
            evaluator.params = trainer.params(state, frozen)
            acc, preds = synthetic.score(evaluator, held_out, batch_size=50)
            kinds = {k: round(float(np.mean(v)), 3) for k, v in synthetic.right_by_kind(held_out, preds).items()}
            history.append({"step": step, "accuracy": acc, "by_kind": kinds,
                            "seconds": round(time.time() - started, 1)})
            log(f"step {step}: exact match {acc:.3f} on {len(held_out)} held-out questions "
                f"({time.time() - started:.0f} s) " + " ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
            return acc

        losses = []
        bar = tqdm(batches(tok, config, seed, batch_size, length, steps, turns), total=steps, desc="training",
                   mininterval=5)
        for step, batch in enumerate(bar, 1):
            state, metrics = trainer.step(state, frozen, trainer.place_batch(batch))
            losses.append(float(metrics["loss"]))
            if step % 25 == 0:
                log(f"step {step}: loss {np.mean(losses[-25:]):.4f} ({time.time() - started:.0f} s)")
            if eval_every and step % eval_every == 0 and step < steps:
                evaluate(step)
        acc = evaluate(steps)
        train_seconds = time.time() - started

        record = {
            "command": "python -m cogvlm_jax.recipes.default_model " + " ".join(sys.argv[1:]),
            "seed": seed, "steps": steps, "batch_size": batch_size, "peak_lr": lr, "warmup": warmup, "turns": turns,
            "examples_seen": steps * batch_size, "parameters": n_params,
            "wall_seconds": round(train_seconds, 1), "final_loss": round(float(np.mean(losses[-25:])), 5),
            "eval_seed": seed + EVAL_SEED_OFFSET, "max_shapes": MAX_SHAPES, "stages": [list(st) for st in STAGES], "kind_weights": KIND_WEIGHTS,
            "position_init": POSITION_INIT, "eval_questions": eval_size, "exact_match": acc,
            "curve": history, "machine": f"{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})",
        }
        with open(os.path.join(work, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
                       "pad_token_id": config.pad_token_id, "do_sample": False, "max_new_tokens": 8}, f, indent=2)
        with open(os.path.join(work, "training.json"), "w") as f:
            json.dump(record, f, indent=2)
        synthetic.example_picture().save(os.path.join(work, "example.png"))
        extra = [os.path.join(work, n) for n in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                                                 "training.json", "example.png")]
        write_hf_checkpoint(jax.device_get(trainer.params(state, frozen)), config, out, dtype="float32", extra_files=extra,
                            overwrite=overwrite, progress=False)
        log(f"wrote {out}: exact match {acc:.3f}, {train_seconds:.0f} s")
        return record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cogvlm_jax.recipes.default_model", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--steps", type=int, default=1700)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--turns", type=int, default=1,
                   help="up to this many questions per picture (all answers labelled). Default 1: with 3, only a "
                        "third of the labelled answers end in eos and the model ran on past its answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=850)
    p.add_argument("--eval-size", type=int, default=200)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.eval_size, args.warmup, args.turns,
          log=lambda s: print(s, flush=True), overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
