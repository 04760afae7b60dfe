"""Shared test helpers: the fixture cases (copied verbatim from ../shared/fixtures) and loaded models."""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import zlib

# Eight fake CPU devices for the mesh tests; must be set before jax is first imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests run on those CPU devices (and so do the processes they start). With the [aot] extra installed,
# JAX would otherwise also start libtpu and the CUDA plugin as local backends, which fail on a machine without
# a TPU or GPU and print their tracebacks to stderr; tests/test_aot.py reaches them as compile-only
# topologies, which this does not affect.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache (cogvlm_jax/parallel/compile_cache.py), in a directory of this test run
# (one set in $COGVLM_JAX_COMPILE_CACHE is kept): the CLIs and servers the tests start read back what this
# process and the others compiled, and nothing is written to the user's own cache. Set up here, before any
# test compiles: JAX decides once per process. The compile-counting tests hold either way: a program read
# back reports its "/jax/core/compile/backend_compile_duration" event like one compiled.
if "COGVLM_JAX_COMPILE_CACHE" not in os.environ:
    import atexit
    import tempfile

    os.environ["COGVLM_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="cogvlm-jax-xla-")
    atexit.register(shutil.rmtree, os.environ["COGVLM_JAX_COMPILE_CACHE"], ignore_errors=True)
from cogvlm_jax.parallel import compile_cache  # noqa: E402

compile_cache.enable()

import numpy as np
import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FIXTURES64 = os.path.join(os.path.dirname(__file__), "fixtures64")  # the official code's float64 numbers
FIXTURES_VIDEO = os.path.join(os.path.dirname(__file__), "fixtures-video")  # CogVLM2-Video's (its README)
FAMILIES = ("cogvlm1", "cogvlm2")


class SafetensorsReads:
    """Counts the bytes read from safetensors files while it is installed (``install(setattr)``, with
    ``monkeypatch.setattr`` or a plain ``setattr``): every tensor and region read goes through
    ``SafetensorsFile.read`` / ``read_region``."""

    def __init__(self):
        self.bytes = 0

    def install(self, setattr_=setattr):
        from cogvlm_jax.convert.convert_hf import SafetensorsFile

        read, region = SafetensorsFile.read, SafetensorsFile.read_region

        def counted(fn):
            def wrapped(*args):
                out = fn(*args)
                self.bytes += out.nbytes
                return out
            return wrapped
        setattr_(SafetensorsFile, "read", counted(read))
        setattr_(SafetensorsFile, "read_region", counted(region))
        return self


def fixture_dir(family: str) -> str:
    return os.path.join(FIXTURES, family)


def cases(family: str) -> list[dict]:
    """cases.json records, each with its arrays under ``arrays`` (an NpzFile)."""
    out = []
    with open(os.path.join(fixture_dir(family), "cases.json")) as f:
        for rec in json.load(f):
            rec = dict(rec)
            rec["arrays"] = np.load(os.path.join(fixture_dir(family), "cases", rec["name"] + ".npz"))
            out.append(rec)
    return out


def left_pad_batch(recs, pad_id: int):
    """Left-pad the fixture prompts of ``recs`` into one batch (pixels zero for text-only rows)."""
    n = max(len(r["arrays"]["input_ids"]) for r in recs)
    b = len(recs)
    ids = np.full((b, n), pad_id, np.int32)
    tt = np.zeros((b, n), np.int32)
    am = np.zeros((b, n), np.int32)
    pix = None
    for i, r in enumerate(recs):
        a = r["arrays"]
        m = len(a["input_ids"])
        ids[i, n - m:], tt[i, n - m:], am[i, n - m:] = a["input_ids"], a["token_type_ids"], a["attention_mask"]
        if "pixel_values" in a.files:
            if pix is None:
                pix = np.zeros((b,) + a["pixel_values"].shape, np.float32)
            pix[i] = a["pixel_values"]
    return ids, tt, am, pix


# The small training set and the settings of tests/test_train_step.py and tests/test_multihost_train.py: the
# same data shapes and TrainConfig in both, so that one compiled one-device step serves both modules.
TRAIN_RECORDS = [  # every prompt + answer is 17..32 tokens: one length bucket, one compile per trainer
    {"image": "red.png", "query": "What color is it?", "answer": "red"},
    {"image": "blue.png", "query": "What color is this one?", "answer": "blue, quite dark"},
    {"query": "Hi?", "answer": "hi all", "history": [["a", "b"]]},
    {"image": "red.png", "query": "Which shape is this?", "answer": "a square"},
    {"query": "Count to three please", "answer": "one two three"},
    {"image": "blue.png", "query": "Is it red?", "answer": "no"},
    {"image": "red.png", "query": "Is it red or blue?", "answer": "yes it is red"},
    {"query": "What is two plus two? Think.", "answer": "four"},
]
# AdamW with eps=1, no clipping or decay, a constant learning rate 1 (TrainConfig(**LINEAR_TRAIN)); see
# tests/test_train_step.py for why. total_steps does not change the numbers (the rate is constant).
LINEAR_TRAIN = dict(learning_rate=1.0, eps=1.0, max_grad_norm=0.0, total_steps=2, end_lr_ratio=1.0)


def write_train_data(directory) -> str:
    """TRAIN_RECORDS as ``directory/train.jsonl`` with their two images beside it; -> the JSONL's path."""
    from PIL import Image

    Image.new("RGB", (40, 30), (220, 20, 20)).save(os.path.join(directory, "red.png"))
    Image.new("RGB", (30, 40), (20, 20, 220)).save(os.path.join(directory, "blue.png"))
    path = os.path.join(directory, "train.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in TRAIN_RECORDS)
    return path


def train_batches(directory, model):
    """The training records written into ``directory`` (``write_train_data``), read for ``model`` and
    batched by 4 with seed 0: the batches the training tests step through."""
    from cogvlm_jax.training.data import Batches, read_jsonl

    recs = read_jsonl(write_train_data(directory), model.tokenizer, model.config)
    return Batches(recs, model.tokenizer, model.config, batch_size=4, seed=0)


def host_flat(tree) -> dict:
    """A (device) pytree on the host, flattened to {path: array}, for comparing trees leaf by leaf."""
    import jax
    from flax.traverse_util import flatten_dict

    return flatten_dict(jax.device_get(tree))


@functools.lru_cache(maxsize=None)
def huge_png(width: int, height: int) -> bytes:
    """A valid black greyscale PNG of ``width`` x ``height`` that compresses to a few bytes per row: a small
    file that decodes to ``width * height`` bytes (three times that as RGB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(6)
    rows = bytes(width + 1) * min(height, 64)  # each row: filter byte 0, then its pixels
    idat = b"".join(z.compress(rows[:(width + 1) * min(64, height - k)]) for k in range(0, height, 64)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def f32_models():
    import cogvlm_jax

    return {fam: cogvlm_jax.load(os.path.join(fixture_dir(fam), "checkpoint"),
                                 tokenizer=os.path.join(fixture_dir(fam), "tokenizer"), progress=False)
            for fam in FAMILIES}


PARITY = 1e-5  # |sharded - one device| logits always allowed (below any float32 implementation's own error)


def float32_bound(fam: str, logits, name: str = "logits") -> float:
    """How far two correct float32 runs of the same function may be apart, measured in this run: one
    device's distance from the float64 references (fixtures64) plus the official float32 code's, the
    largest over the cases. ``logits``: one device's [B, L, V] for ``left_pad_batch(cases(fam))``."""
    worst = 0.0
    for i, rec in enumerate(cases(fam)):
        a = rec["arrays"]
        exact = np.load(os.path.join(FIXTURES64, fam, rec["name"] + ".f64.npz"))["logits"]
        ours = logits[i, -len(a["input_ids"]):][:, a["logits_columns"]]
        worst = max(worst, float(np.abs(ours - exact).max() + np.abs(a["logits"] - exact).max()))
    return worst


@pytest.fixture(scope="session")
def reference(f32_models):
    """Single-device logits and greedy ids (6 tokens) for a left-padded batch of all cases of each family,
    and the bound a sharded run's logits must stay within: ``max(PARITY, float32_bound)``, since the kernels
    XLA:CPU picks for a device's narrower blocks round differently on different CPUs.
    {family: (batch, logits, ids, bound)}."""
    out = {}
    for fam in FAMILIES:
        m = f32_models[fam]
        batch = left_pad_batch(cases(fam), m.config.pad_token_id)
        logits = m.forward(*batch)
        out[fam] = (batch, logits, m.generate(*batch, max_new_tokens=6), max(PARITY, float32_bound(fam, logits)))
    return out


# Headless chromium for the chat-page tests (Playwright drives Debian's chromium, not a downloaded one).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    """Debian's chromium; skips the test where it is missing (fails it on CI, which installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium")
        pytest.skip("no chromium here (apt-get install chromium)")
    return path
