"""Time to the first token of a follow-up turn about an image, with the prefix cache and without.

A conversation's second turn repeats the first: bos, the image, the first question and its answer, then
the new question. With the prefix cache (``Model(prefix_cache_bytes=...)``, on by default) ``chat`` keeps
the keys and values of the first turn's prompt and answer, and the follow-up prefills only the tokens
after the longest prefix they stand for (``CogVLM.extend``: text, no ViT). Without it the whole prompt is
prefilled again, the ViT included.

The model: the TTFT benchmark's mid-size CogVLM-1-style float32 model (``ttft.TTFT_HF_CONFIG``, 258 image
tokens, random weights) with the shipped default model's tokenizer, on the default model's example
picture. The first turn asks ``FIRST`` (its answer: up to ``ANSWER_TOKENS`` generated tokens); the follow-up
carries a fixed answer text in its history (``ANSWER``), as a client sends back what it was shown: a
random model's generated ids do not re-tokenize to themselves, so only the first turn's prompt is reused
here, the worst case of a real conversation (a real answer re-tokenizes mostly to its own ids).

Records (best of N, each repetition from an empty cache: the first turn, then the follow-up):

* ``first_turn_ttft``: the first turn's time to its first token (a cache-on model, nothing kept);
* ``followup_ttft`` with ``cache`` on / off: the follow-up's; ``ratio_to_first_turn`` (the target: at
  most 0.3), ``cached_tokens`` and ``new_tokens`` (what was prefilled).

Each limit is the useful FLOPs of what the call must compute at the float32 matmul peak: the whole prompt
with its image (``prefill.prefill_flops``) without the cache, the new tokens over the whole context with
it (:func:`extension_flops`).
"""

from __future__ import annotations

import os
import time

from benchmarks.common import record
from benchmarks.decode import make_params
from benchmarks.prefill import decoder_token_flops, matmul_peak, prefill_flops
from benchmarks.ttft import ttft_config

FIRST = "Describe the picture in detail."
ANSWER = "A red circle on a plain white background, drawn near the middle of the picture."
FOLLOW_UP = "What colour is the circle, and where is it?"
ANSWER_TOKENS = 16


def extension_flops(config, new: int, total: int) -> float:
    """Useful FLOPs of ``new`` text tokens appended to a context of ``total`` tokens (the new ones
    included): the language expert's products on the new tokens, their attention over the context
    (scores and values), the lm_head on the last."""
    t = config.text
    attention = 4 * new * total * t.hidden_size
    return float(t.num_layers * (new * decoder_token_flops(config) + attention) + 2 * t.hidden_size * t.vocab_size)


def first_token_seconds(model, image, query, history) -> float:
    """Wall time of ``Model.stream``'s work up to its first token: the prompt built from the image and
    text, the prefill (after a kept prefix, if any) and the first token chosen. The rest of the answer is
    then generated and, with the cache, kept."""
    x = model.build_inputs(query, history, image)
    t0 = time.perf_counter()
    kept = {}
    chunks = model._chunks(x["input_ids"][None], x["token_type_ids"][None], x["attention_mask"][None],
                           x["pixel_values"][None], ANSWER_TOKENS, 0.0, None, None, 0, 4, kept)
    _, state = next(chunks)
    seconds = time.perf_counter() - t0
    for _, state in chunks:
        pass
    model._keep(kept, state)
    model.last_cached_tokens = kept.get("cached", 0)
    return seconds


def run(quick: bool = False, repeats: int | None = None) -> list[dict]:
    from PIL import Image

    from cogvlm_jax.api import DEFAULT_MODEL, Model
    from cogvlm_jax.inputs.tokenizer import find_tokenizer

    repeats = repeats or (3 if quick else 7)
    config = ttft_config()
    params = make_params(config, "float32")
    tokenizer = find_tokenizer(DEFAULT_MODEL)
    image = Image.open(os.path.join(DEFAULT_MODEL, "example.png")).convert("RGB")
    peak = matmul_peak("float32", n=1024 if quick else 2048, repeats=3 if quick else 5)
    models = {"on": Model(config, params, tokenizer), "off": Model(config, params, tokenizer, prefix_cache_bytes=0)}
    history = [(FIRST, ANSWER)]
    first_n = len(models["on"].build_inputs(FIRST, (), image)["input_ids"])
    follow_n = len(models["on"].build_inputs(FOLLOW_UP, history, image)["input_ids"])
    times: dict[str, list[float]] = {"first": [], "on": [], "off": []}
    cached = 0
    for rep in range(repeats + 1):  # the first round compiles
        models["on"].prefix_cache.clear()
        first = first_token_seconds(models["on"], image, FIRST, ())
        on = first_token_seconds(models["on"], image, FOLLOW_UP, history)
        cached = models["on"].last_cached_tokens
        off = first_token_seconds(models["off"], image, FOLLOW_UP, history)
        if rep:
            times["first"].append(first)
            times["on"].append(on)
            times["off"].append(off)
    best = {k: min(v) for k, v in times.items()}
    first_flops, off_flops = prefill_flops(config, first_n), prefill_flops(config, follow_n)
    on_flops = extension_flops(config, follow_n - cached, follow_n)
    common = dict(config="mid-cogvlm1", dtype="float32", batch=1, limit_gflop_s=peak / 1e9)
    recs = [record("first_turn_ttft", best["first"] * 1e3, "ms", fraction_of_limit=first_flops / peak / best["first"],
                   prompt_tokens=first_n, model_gflop=first_flops / 1e9, **common)]
    for cache, flops in (("on", on_flops), ("off", off_flops)):
        recs.append(record("followup_ttft", best[cache] * 1e3, "ms", fraction_of_limit=flops / peak / best[cache],
                           cache=cache, prompt_tokens=follow_n, cached_tokens=cached if cache == "on" else 0,
                           new_tokens=follow_n - (cached if cache == "on" else 0), model_gflop=flops / 1e9,
                           ratio_to_first_turn=best[cache] / best["first"], **common))
    assert cached > 0, "the follow-up reused nothing"
    return recs


if __name__ == "__main__":
    import argparse

    from benchmarks.common import emit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    for r in run(ap.parse_args().quick):
        emit(r)
