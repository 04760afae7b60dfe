"""Shared pieces of the benchmarks: the measurement record, best-of-N timing, the configs measured.

A measurement is one JSON-able dict with the fields every consumer relies on::

    name, config, dtype, batch, value, unit, fraction_of_limit

plus free-form ``extra`` details (the limit it is compared with, bytes per step, ...).
``fraction_of_limit`` is None where a number has no hardware limit (the limits themselves).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Optional

GB = 1e9

# The representative mid-size CogVLM2-style model (an HF config.json, built through
# CogVLMConfig.from_hf_dict like a published checkpoint): 1024 wide, 8 layers, GQA 16/4, vocab 32000;
# a 4-layer 512-wide ViT on 224 px images (16x16 patches, 2x2 downsampled to 64 image tokens).
MID_HF_CONFIG: dict[str, Any] = {
    "architectures": ["CogVLMForCausalLM"],
    "cogvlm_family": "cogvlm2",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_multi_query_heads": 4,
    "num_hidden_layers": 8,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
    "vision_config": {
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_heads": 8,
        "num_hidden_layers": 4,
        "image_size": 224,
        "patch_size": 14,
        "num_positions": 257,
    },
}

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")
CONFIG_NAMES = ("mid", "tiny-cogvlm1", "tiny-cogvlm2")
TINY_NAMES = ("tiny-cogvlm1", "tiny-cogvlm2")


def load_bench_config(name: str):
    """``"mid"`` or ``"tiny-cogvlm1"`` / ``"tiny-cogvlm2"`` (the test fixtures' config.json) -> CogVLMConfig."""
    from cogvlm_jax.config import CogVLMConfig

    if name == "mid":
        return CogVLMConfig.from_hf_dict(MID_HF_CONFIG)
    if name in TINY_NAMES:
        return CogVLMConfig.from_json_file(os.path.join(FIXTURES, name[len("tiny-"):], "checkpoint", "config.json"))
    raise ValueError(f"unknown benchmark config {name!r}; expected one of {', '.join(CONFIG_NAMES)}")


def record(name: str, value: float, unit: str, *, config: str = "", dtype: str = "", batch: Optional[int] = None,
           fraction_of_limit: Optional[float] = None, **extra) -> dict[str, Any]:
    """One measurement; ``extra`` holds the details (rounded floats keep the JSON line short)."""
    def tidy(v):
        return round(v, 4) if isinstance(v, float) else v

    return {"name": name, "config": config, "dtype": dtype, "batch": batch, "value": tidy(float(value)),
            "unit": unit, "fraction_of_limit": None if fraction_of_limit is None else round(fraction_of_limit, 4),
            "extra": {k: tidy(v) for k, v in extra.items()}}


def emit(rec: dict[str, Any], out=None) -> None:
    """Print one measurement as one JSON line (flushed: a long run shows progress)."""
    import sys

    out = out or sys.stdout
    out.write(json.dumps(rec) + "\n")
    out.flush()


def best_time(fn: Callable[[], Any], repeats: int, setup: Optional[Callable[[], Any]] = None) -> float:
    """Smallest wall time in seconds of ``fn(setup())`` (or ``fn()``) over ``repeats`` runs.

    ``fn`` must block until its device work is done (``jax.block_until_ready``); ``setup`` runs
    untimed before each repetition (e.g. a fresh donated state). The minimum is the right statistic
    for a machine shared with other processes: noise only ever adds time.
    """
    best = float("inf")
    for _ in range(repeats):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        best = min(best, time.perf_counter() - t0)
    return best


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree (shapes and dtypes only; works on ShapeDtypeStructs)."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def last_level_cache_bytes() -> Optional[int]:
    """The CPU's largest cache in bytes (Linux sysfs), or None where unknown.

    A decode step whose bytes fit in it is served from cache, not DRAM: its "fraction of the
    bandwidth probe" can exceed 1 and says nothing about the DRAM roofline (the tiny configs).
    """
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return max(sizes) if sizes else None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: backend, device kind, CPU count, load average."""
    import jax

    d = jax.devices()[0]
    info = {"backend": jax.default_backend(), "device": getattr(d, "device_kind", str(d)),
            "devices": jax.device_count(), "cpus": os.cpu_count(), "jax": jax.__version__}
    llc = last_level_cache_bytes()
    if llc and info["backend"] == "cpu":
        info["llc_mb"] = llc / 2**20
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info
