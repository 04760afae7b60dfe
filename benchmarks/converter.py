"""Converter throughput and memory: HF safetensors -> our checkpoint -> HF, each in a child process.

The benchmark writes its own multi-GB sharded bfloat16 HF checkpoint of random tensors (many layers, a
Llama-3 sized vocabulary, a tiny width: the shape of the problem, parameters by the gigabyte, without
needing a real 40 GB download), runs ``python -m cogvlm_jax.cli convert SRC DST`` as a child, then the export
``convert DST BACK --to hf``, and reports for each (``convert_*``, ``export_*``):

* ``*_throughput``: checkpoint MB / child wall time (python start and imports included),
  against a plain copy of the same shards (``shutil.copyfile``: the same bytes read and written, in
  the same page-cache state), which is what a conversion could at best do;
* ``*_peak_rss``: the child's peak resident set (its ``VmHWM``, polled), against the 1 GB
  target; ``import_rss_mb`` in its extras is the peak of a child that only imports the same
  modules, i.e. the part of the peak the data is not responsible for.

Everything is written under a temporary directory in /tmp and deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import record

MB = 1e6
TARGET_RSS_BYTES = 1 << 30  # the conversion's peak RSS must stay under 1 GB whatever the size


def checkpoint_config(layers: int, hidden: int = 256, intermediate: int = 2048, vocab: int = 128256,
                      heads: int = 4) -> dict:
    """An HF config.json of a CogVLM2-shaped model: deep, narrow, with the published vocabulary."""
    return {
        "architectures": ["CogVLMForCausalLM"], "cogvlm_family": "cogvlm2",
        "hidden_size": hidden, "intermediate_size": intermediate, "num_attention_heads": heads,
        "num_multi_query_heads": 2, "num_hidden_layers": layers, "vocab_size": vocab,
        "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "pad_token_id": 128002, "torch_dtype": "bfloat16",
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_hidden_layers": 2,
                          "image_size": 56, "patch_size": 14, "num_positions": 17},
    }


def _random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random bfloat16 bit patterns with |x| in [2^-7, 2^-6): random sign and mantissa, fixed exponent
    (finite, no denormals; raw bytes are much faster to draw than normals)."""
    bits = np.frombuffer(rng.bytes(2 * n), np.uint16).copy()
    bits &= 0x807F  # keep sign and mantissa
    bits |= 0x3C00  # exponent 2^-7
    return bits


def make_hf_checkpoint(out_dir: str, layers: int, shard_bytes: int = 512 * 2**20, seed: int = 0, **dims) -> int:
    """Write a complete sharded bfloat16 HF checkpoint of ``checkpoint_config(layers, **dims)`` with the
    converter's own writer (random tensors, made a run at a time as it writes them); -> bytes of tensor data."""
    import ml_dtypes
    from cogvlm_jax.convert import convert_hf, mapping

    from cogvlm_jax.config import CogVLMConfig

    config = CogVLMConfig.from_hf_dict(checkpoint_config(layers, **dims))
    bf16 = np.dtype(ml_dtypes.bfloat16)
    shapes = mapping.expected_params_shapes(config)
    rng = np.random.default_rng(seed)

    def fetch(paths):
        return {p: _random_bf16(rng, int(np.prod(shapes[p], dtype=np.int64))).view(bf16).reshape(shapes[p])
                for p in paths}

    source = convert_hf.Source({p: (tuple(s), bf16) for p, s in shapes.items()}, fetch)
    convert_hf.write_hf(source, config, out_dir, shard_bytes, None, None, None, False, (), False)
    buffers = set(mapping.buffer_hf_keys(config))  # the rotary inv_freq buffers, float32 as the reference's
    return sum(int(np.prod(s, dtype=np.int64)) * (4 if k in buffers else 2)
               for k, s in mapping.expected_hf_keys(config).items())


def _vm_hwm(pid: int) -> int | None:
    """The peak resident set of a live process in bytes (``VmHWM`` of /proc/PID/status), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_child(argv: list[str], log_path: str, poll_s: float = 0.02) -> tuple[float, int, int]:
    """Run ``argv`` with output to ``log_path``; -> (wall seconds, exit code, peak RSS bytes of that child).

    The peak is the child's own ``VmHWM`` (the high-water mark of its address space, which starts
    afresh at exec), polled until it exits; it is monotonic, so the last reading is the peak unless
    the peak came in the last ``poll_s``. Not ``getrusage``: on Linux a child's ``ru_maxrss`` keeps
    the RSS its parent had when it forked, so a child of a big process (this one, after the decode
    benchmarks) would report the parent's size.
    """
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    peak = 0
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
        while True:
            hwm = _vm_hwm(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(poll_s)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, proc.returncode, peak


def copy_time(src: str, dst: str) -> float:
    """Seconds to copy every file of ``src`` into ``dst`` (then deleted): the I/O floor of a conversion."""
    os.makedirs(dst)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(src)):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    t = time.perf_counter() - t0
    shutil.rmtree(dst)
    return t


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# (name, layers, dimensions): the deep narrow model (parameters by the gigabyte in many small tensors), and
# the published CogVLM2-19B's embedding and lm_head (128256 x 4096 bfloat16, 1.05 GB each: each larger than
# the memory a conversion may hold, so they go through in row blocks) with two layers of it.
CASES = (("deep", None, {}), ("cogvlm2_embed", 2, {"hidden": 4096, "intermediate": 64, "heads": 32}))


def run(quick: bool = False, layers: int | None = None, workdir: str | None = None,
        cases: tuple[str, ...] | None = None) -> list[dict]:
    """Generate each case's checkpoint, convert it and export it back in children, report MB/s and peak RSS;
    delete everything. ``cases``: names from ``CASES`` (default all)."""
    recs = []
    for name, case_layers, dims in CASES:
        if cases is None or name in cases:
            recs += _run_case(name, case_layers or layers or (24 if quick else 280), dims, workdir)
    return recs


def _run_case(name: str, layers: int, dims: dict, workdir: str | None) -> list[dict]:
    root = tempfile.mkdtemp(prefix="cogvlm-bench-convert-", dir=workdir or "/tmp")
    try:
        src, dst, log = os.path.join(root, "hf"), os.path.join(root, "ours"), os.path.join(root, "convert.log")
        t0 = time.perf_counter()
        nbytes = make_hf_checkpoint(src, layers, **dims)
        gen_s = time.perf_counter() - t0
        n_shards = sum(f.endswith(".safetensors") for f in os.listdir(src))
        copy_s = copy_time(src, os.path.join(root, "copy"))
        # The same imports without the data: the floor of the child's RSS.
        imp_s, rc, imp_rss = run_child([sys.executable, "-c", "import cogvlm_jax.cli, cogvlm_jax.convert.convert_hf, "
                                        "orbax.checkpoint, jax; jax.numpy.zeros(1).block_until_ready()"], log)
        hf = checkpoint_config(layers, **dims)
        cfg = f"{layers}L-{hf['hidden_size']}w-v{hf['vocab_size']}"
        largest = max(int(np.prod(s)) * 2 for s in _shapes(hf).values())
        recs = []
        for step, argv in (("convert", [src, dst]), ("export", [dst, os.path.join(root, "back"), "--to", "hf"])):
            wall, rc, rss = run_child([sys.executable, "-m", "cogvlm_jax.cli", "convert", *argv], log)
            if rc != 0:
                with open(log, "rb") as f:
                    tail = f.read()[-2000:].decode(errors="replace")
                raise RuntimeError(f"{step} failed (exit {rc}):\n{tail}")
            common = dict(case=name, checkpoint_mb=nbytes / MB, shards=n_shards, layers=layers,
                          largest_tensor_mb=largest / MB, output_mb=_dir_bytes(argv[1]) / MB,
                          wall_s=wall, import_s=imp_s, generate_s=gen_s)
            prefix = step if name == "deep" else f"{step}_{name}"
            recs += [
                record(f"{prefix}_throughput", nbytes / MB / wall, "MB/s", config=cfg, dtype="bfloat16",
                       fraction_of_limit=copy_s / wall, limit_mb_s=nbytes / MB / copy_s, **common),
                record(f"{prefix}_peak_rss", rss / MB, "MB", config=cfg, dtype="bfloat16",
                       fraction_of_limit=rss / TARGET_RSS_BYTES, limit_mb=TARGET_RSS_BYTES / MB,
                       import_rss_mb=imp_rss / MB, rss_over_checkpoint=rss / nbytes, **common),
            ]
        return recs
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    from cogvlm_jax.convert import mapping

    from cogvlm_jax.config import CogVLMConfig

    return mapping.expected_hf_keys(CogVLMConfig.from_hf_dict(hf))
