"""Time to the first token of an image prompt, and where the prefill's time goes, against the matmul peak.

The case of the prefill issue: a mid-size CogVLM-1-style float32 model (``TTFT_HF_CONFIG``: text 1024 wide,
8 layers, 16 heads, mlp 2816, vocab 32000; ViT 512 wide, 8 layers, 224 px) and a 274-token prompt (bos,
the 258 image tokens, 15 text tokens: "Describe the picture in detail." in a chat template).

``ttft``: wall time from ``Model.generate_chunks`` to its first yield (the host's padding and placing, the
prefill, the first token chosen and one decode step), best of N, for the float32 prefill and for the
bfloat16 one (``Model(prefill_dtype="bfloat16")``). Its limit: the prefill's useful FLOPs
(``prefill.prefill_flops``) at the matmul peak of the dtype its products multiply in.

``ttft_part``: each part of the prefill jitted and timed alone, in the same execution as the prefill's:
the ViT (patch embedding and blocks), the adapter (GLU, boi / eoi), per decoder layer (times the layers)
the vision expert's projections on the image tokens, the language expert's on the text tokens and the
attention (rope and the scores over the whole prompt), and the lm_head on the last position. Each has
its FLOPs and its fraction of the peak. The parts do not add up to the prefill exactly: it fuses across
them and also splices, normalises and writes the cache.

Also ``ttft_bf16_gap``: the largest gap between the first token's logits of the two prefills, and whether
they choose the same first token (random weights: a measure of bfloat16 rounding, not of a checkpoint).

Axis legend: B batch, L prompt length, N image tokens, D text width.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import record
from benchmarks.decode import image_prompt, make_params
from benchmarks.prefill import matmul_peak, prefill_flops, prefill_parts

TTFT_HF_CONFIG: dict[str, Any] = {
    "architectures": ["CogVLMForCausalLM"],
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_hidden_layers": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_heads": 8,
        "num_hidden_layers": 8,
        "image_size": 224,
        "patch_size": 14,
        "num_positions": 257,
    },
}
PROMPT_TOKENS = 274
PREFILLS = ("float32", "bfloat16")  # the prefill's products: the model's own, or Model(prefill_dtype=...)


def ttft_config():
    from cogvlm_jax.config import CogVLMConfig

    return CogVLMConfig.from_hf_dict(TTFT_HF_CONFIG)


def _best(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def first_token_seconds(model, inputs, repeats: int):
    """Best wall time from ``generate_chunks`` to its first yield, and the first yield's logits."""
    ids, tt, am, pix = inputs

    def first():
        return next(iter(model.generate_chunks(ids, tt, am, pix, max_new_tokens=8)))

    first()  # compile the prefill and the decode loop
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        first()
        best = min(best, time.perf_counter() - t0)
    state = model.generate_state(ids, tt, am, pix, max_new_tokens=1, collect_logits=True)
    return best, np.asarray(state.chosen_logits)[:, 0]


def part_times(model, params, inputs, repeats: int) -> dict[str, float]:
    """Seconds of each part of the prefill, each jitted alone with the prefill program's module."""
    from cogvlm_jax.models.adapter import GLU
    from cogvlm_jax.models.decoder import MLP
    from cogvlm_jax.models.layers import Dense, apply_rope
    from cogvlm_jax.models import attention, positions
    from cogvlm_jax.models.vision import PatchEmbedding, Transformer

    cfg = model.config
    ex = model.module.execution.replace(matmul_dtype=model.prefill_dtype)
    dt = model.module.dtype
    v, t = cfg.vision, cfg.text
    p = params
    pix = jnp.asarray(inputs[3])
    ids, tt, am = (jnp.asarray(a) for a in inputs[:3])
    length = ids.shape[1]
    image = cfg.num_image_tokens - 1
    out = {}

    pe = PatchEmbedding(v, dt, ex)
    tr = Transformer(v, dt, None, False, ex)
    vit = jax.jit(lambda pv: tr.apply({"params": p["vision"]["transformer"]},
                                      pe.apply({"params": p["vision"]["patch_embedding"]}, pv)))
    out["vit"] = _best(lambda: vit(pix), repeats)
    feats = vit(pix)[:, 1:]
    glu = GLU(cfg, dt, ex)
    adapter = jax.jit(lambda x: glu.apply({"params": p["vision"]["linear_proj"]}, x))
    out["adapter"] = _best(lambda: adapter(feats), repeats)

    layer = p["layers_0"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, length, t.hidden_size)), jnp.float32)

    def expert(kind, rows):
        qkv = Dense(t.qkv_size, ("embed", "qkv"), use_bias=kind == "vision" and t.vision_qkv_bias, dtype=dt,
                    out_in=True, execution=ex)
        dense = Dense(t.hidden_size, ("proj_in", "proj_out"), dtype=dt, out_in=True, gather=True, execution=ex)
        mlp = MLP(t, dt, ex)
        a = layer["self_attn"]

        def f(xr):
            y = qkv.apply({"params": a[f"{kind}_expert_query_key_value"]}, xr)
            o = dense.apply({"params": a[f"{kind}_expert_dense"]}, y[..., :t.hidden_size])
            return mlp.apply({"params": layer["mlp"][f"{kind}_mlp"]}, o)

        fj = jax.jit(f)
        xr = x[:, :rows]
        return _best(lambda: fj(xr), repeats) * t.num_layers

    out["vision_expert"] = expert("vision", image)
    out["language_expert"] = expert("language", length - image)
    pos = positions.position_ids(tt, am)
    mask = positions.causal_mask(am)
    h, kh, e = t.num_heads, t.num_kv_heads, t.head_dim
    q = jnp.asarray(np.random.default_rng(1).standard_normal((1, length, h, e)), dt)
    k = q[:, :, :kh]

    def attend(q, k):
        qr, kr = apply_rope(q, pos, t.rope_theta), apply_rope(k, pos, t.rope_theta)
        return attention.attend(qr, kr, k, mask, platform=ex.platform)

    att = jax.jit(attend)
    out["attention"] = _best(lambda: att(q, k), repeats) * t.num_layers
    head = Dense(t.vocab_size, ("embed", "vocab"), dtype=dt, out_in=True, execution=ex.replace(matmul_dtype=None))
    hj = jax.jit(lambda xl: head.apply({"params": p["lm_head"]}, xl))
    out["lm_head"] = _best(lambda: hj(x[:, -1]), repeats)
    return out


def run(quick: bool = False, prefills=PREFILLS, repeats: int | None = None) -> list[dict]:
    """TTFT per prefill dtype and its parts, against the float32 and bfloat16 matmul peaks."""
    from cogvlm_jax.api import Model

    repeats = repeats or (3 if quick else 7)
    config = ttft_config()
    params = make_params(config, "float32")
    inputs = image_prompt(config, 1, PROMPT_TOKENS)
    flops = prefill_flops(config, PROMPT_TOKENS)
    parts = prefill_parts(config, PROMPT_TOKENS)
    recs, firsts = [], {}
    n = 1024 if quick else 2048
    for prefill in prefills:
        peak = matmul_peak(prefill, n=n, repeats=3 if quick else 5, native=True)
        recs.append(record("matmul_peak", peak / 1e9, "GFLOP/s", dtype=prefill, n=n))
        model = Model(config, params, None, "float32", prefill_dtype=None if prefill == "float32" else prefill)
        seconds, firsts[prefill] = first_token_seconds(model, inputs, repeats)
        recs.append(record("ttft", seconds * 1e3, "ms", config="mid-cogvlm1", dtype=prefill, batch=1,
                           fraction_of_limit=flops / peak / seconds, prompt_tokens=PROMPT_TOKENS,
                           image_tokens=config.num_image_tokens, model_gflop=flops / 1e9,
                           floor_ms=flops / peak * 1e3, limit_gflop_s=peak / 1e9,
                           achieved_gflop_s=flops / seconds / 1e9))
        times = part_times(model, model._prefill_params, inputs, repeats)
        for part, s in times.items():
            recs.append(record(f"ttft_part_{part}", s * 1e3, "ms", config="mid-cogvlm1", dtype=prefill, batch=1,
                               fraction_of_limit=parts[part] / peak / s, gflop=parts[part] / 1e9,
                               achieved_gflop_s=parts[part] / s / 1e9, share_of_ttft=s / seconds))
        del model
    if "float32" in firsts and len(firsts) > 1:
        ref = firsts["float32"]
        for prefill, got in firsts.items():
            if prefill == "float32":
                continue
            gap = float(np.max(np.abs(got - ref)))
            recs.append(record("ttft_bf16_gap", gap, "logit", config="mid-cogvlm1", dtype=prefill, batch=1,
                               logit_std=float(np.std(ref)), same_first_token=bool(
                                   (got.argmax(-1) == ref.argmax(-1)).all())))
    return recs


if __name__ == "__main__":
    import argparse

    from benchmarks.common import emit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        emit(r)
