"""A fine-tuning run in a directory: the loop behind ``cogvlm-jax train``.

The run directory holds::

    run.json                  the settings (data, model, batch size, TrainConfig, seed, dtype, mesh), and the
                              data file's size and sha256 (``data_fingerprint``)
    log.jsonl                 one line per step: step, epoch, loss, tokens, lr, grad_norm, seconds
    checkpoints/step_NNNNNNNN/ train.json + state/ (Orbax: trainable parameters or LoRA factors, optimizer
                              state, step, RNG), each written atomically; the newest ``keep`` are kept
    model/                    the result in Hugging Face format (safetensors + config.json), LoRA merged,
                              with the tokenizer and generation config copied: ``cogvlm_jax.load`` and
                              ``cogvlm-jax generate --model`` read it (a QLoRA run's: float weights, the
                              dequantized base with the factors merged)

Resuming (``resume=True``) reads ``run.json``, restores the newest checkpoint and continues: the batch of
step k is a function of (seed, k) (``data.Batches``), so a resumed run computes exactly what an
uninterrupted one does, bit for bit (tested), provided the data is the same: a data file whose size or
sha256 differs from the one recorded at the start is refused. Log lines after the restored step are dropped.

Across several processes (``multihost.initialize`` first; the mesh spans every process's devices, e.g.
fsdp over the processes) every process calls :func:`fit` with the same arguments: every one reads the
data and builds the same whole batch of each step, and puts on its devices only their rows; the step runs
on the global mesh. Checkpoints are written and restored by all processes together (each its own shards),
the export is gathered one file at a time and written by process 0, which alone writes ``run.json``, the
log and the progress bar. The run directory, the data and the model must be at the same paths on every
process (shared storage across hosts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict
from tqdm import tqdm

from cogvlm_jax import files
from cogvlm_jax.dtypes import DTYPES, model_dtype
from cogvlm_jax.config import load_config
from cogvlm_jax.convert.checkpoint import CheckpointError, is_our_checkpoint, stored_quantization
from cogvlm_jax.convert.convert_hf import write_hf_checkpoint
from cogvlm_jax.convert.params import read_params
from cogvlm_jax.inputs.tokenizer import find_tokenizer, tokenizer_files
from cogvlm_jax.parallel import multihost
from cogvlm_jax.training import trainer as train
from cogvlm_jax.training.data import Batches, DataError, read_jsonl

RUN_FILE = "run.json"
LOG_FILE = "log.jsonl"
CHECKPOINTS = "checkpoints"
EXPORT = "model"
FINGERPRINT = "data_fingerprint"  # run.json's record of the data file, beside the settings


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: str                                   # the JSONL file
    model: str                                  # checkpoint to start from (HF or ours)
    train: train.TrainConfig = train.TrainConfig()
    batch_size: int = 8                         # records per optimizer step (all micro-batches)
    tokenizer: Optional[str] = None             # default: beside the model
    template: Optional[str] = None              # default: the model's
    seed: int = 0                               # data order (and LoRA initialisation)
    dtype: str = "float32"                      # compute dtype and the frozen weights'; trainable stay float32
    mesh: tuple[int, int, int] = (1, 1, 1)      # data, fsdp, tensor

    def __post_init__(self):
        train.check_field_types(self)
        if not isinstance(self.train, train.TrainConfig):
            raise ValueError(f"train must be a TrainConfig, got {self.train!r}")
        if len(self.mesh) != 3 or min(self.mesh) < 1:
            raise ValueError(f"mesh must be three device counts >= 1 (data, fsdp, tensor), got {self.mesh!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} unknown; expected one of {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.batch_size % self.train.accum:
            raise ValueError(f"batch size {self.batch_size} must be a positive multiple of accum {self.train.accum}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train"] = self.train.to_dict()
        d["mesh"] = list(self.mesh)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunConfig":
        d = dict(d)
        d["train"] = train.TrainConfig.from_dict(d["train"])
        d["mesh"] = tuple(d["mesh"])
        return cls(**d)


# --------------------------------------------------------------------------- the run directory
def checkpoint_steps(out: str) -> list[int]:
    """Steps of the complete checkpoints in ``out`` (ascending)."""
    root = os.path.join(out, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        if name.startswith("step_") and os.path.isfile(os.path.join(root, name, train.META_FILE)):
            steps.append(int(name[len("step_"):]))
    return sorted(steps)


def checkpoint_dir(out: str, step: int) -> str:
    return os.path.join(out, CHECKPOINTS, f"step_{step:08d}")


def _read_run_file(out: str) -> tuple[RunConfig, Optional[dict]]:
    """(the settings, the data fingerprint or None for a run file that records none) of ``out``'s run."""
    path = os.path.join(out, RUN_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{out} holds no training run ({RUN_FILE} missing); start one without --resume")
    try:
        with open(path) as f:
            d = json.load(f)
        fingerprint = d.pop(FINGERPRINT, None)
        if fingerprint is not None and (not isinstance(fingerprint, dict) or set(fingerprint) != {"bytes", "sha256"}):
            raise ValueError(f"{FINGERPRINT} must be an object of bytes and sha256, got {fingerprint!r}")
        return RunConfig.from_dict(d), fingerprint
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, edited, or from another version
        raise CheckpointError(f"{path} is not a valid run file: {type(e).__name__}: {e}") from None


def read_run(out: str) -> RunConfig:
    return _read_run_file(out)[0]


def data_fingerprint(path: str) -> dict:
    """{"bytes", "sha256"} of the data file (streamed; the file is read in full for training anyway)."""

    if not os.path.isfile(path):
        raise DataError(f"training data {path} not found")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def _check_same_data(out: str, path: str, saved: Optional[dict]) -> None:
    """Refuse to resume on a data file other than the one the run started with (other records: other batches)."""

    if saved is None:  # the run file records no fingerprint: nothing to compare with
        return
    now = data_fingerprint(path)
    if now != saved:
        raise DataError(f"the training data {path} is not the file the run in {out} started with "
                        f"({saved['bytes']} bytes, sha256 {str(saved['sha256'])[:16]}...; now {now['bytes']} "
                        f"bytes, sha256 {now['sha256'][:16]}...): resuming on other data would not continue the run. "
                        "Put the original file back, or start a new run in another --out")


def differences(a: RunConfig, b: RunConfig) -> list[str]:
    """``name: a -> b`` for every setting that differs between two runs."""
    fa, fb = flatten_dict(a.to_dict(), sep="."), flatten_dict(b.to_dict(), sep=".")
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def _truncate_log(path: str, step: int) -> None:
    """Keep the log lines of steps <= ``step`` (those the restored state has done)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
    files.write_text(path, "".join(kept))


def export_files(run: RunConfig) -> list[str]:
    """Files to ship with the export: those of the tokenizer the run trained with (``--tokenizer``, or the
    model's), and the model's generation settings."""
    generation = os.path.join(run.model, "generation_config.json")
    return tokenizer_files(run.tokenizer or run.model) + ([generation] if os.path.isfile(generation) else [])


# --------------------------------------------------------------------------- the loop
def fit(out: str, run: Optional[RunConfig] = None, *, resume: bool = False, epochs: Optional[float] = None,
        save_every: int = 100, keep: int = 3, progress: bool = True, export: bool = True) -> str:
    """Train ``run`` in the directory ``out`` (or continue the run there with ``resume``) and export it.

    ``epochs``: set ``run.train.total_steps`` to cover that many passes over the data (on resume it must
    give the run's own step count).
    Returns the export directory (``out/model``), or ``out`` with ``export=False``.
    """
    out = os.path.abspath(out)
    if resume:
        saved, fingerprint = _read_run_file(out)
        if run is not None and run != saved:
            raise ValueError(f"a resumed run keeps the settings in {out}/{RUN_FILE}; these differ: "
                             + ", ".join(differences(saved, run)))
        run = saved
        _check_same_data(out, run.data, fingerprint)
    elif run is None:
        raise ValueError("fit needs a RunConfig for a new run")
    else:
        def fresh() -> bytes:
            if os.path.lexists(out) and not os.path.isdir(out):
                raise CheckpointError(f"the run directory {out} exists and is not a directory")
            if os.path.exists(os.path.join(out, RUN_FILE)) or checkpoint_steps(out):
                raise CheckpointError(f"{out} already holds a training run; pass --resume to continue it, or "
                                      "choose another --out")
            return b""
        multihost.from_main(fresh)  # process 0 looks (before it writes run.json); its refusal is raised on all
    if save_every < 1 or keep < 1:
        raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")

    _check_quantized_model(run)  # before anything is written
    # The data is read and checked before the (possibly large) model is loaded.
    if not resume:
        fingerprint = data_fingerprint(run.data)
    config = load_config(run.model)
    tokenizer = find_tokenizer(run.tokenizer or run.model)
    if tokenizer is None:
        raise ValueError(f"training needs a tokenizer: none at {run.tokenizer or run.model}; give its file or "
                         "directory as RunConfig(tokenizer=PATH)")
    records = read_jsonl(run.data, tokenizer, config, run.template, progress=progress and multihost.is_main_process())
    batches = Batches(records, tokenizer, config, run.batch_size, run.seed, run.template)
    if epochs is not None:
        steps = max(1, math.ceil(epochs * batches.steps_per_epoch))
        if resume and steps != run.train.total_steps:
            raise ValueError(f"{epochs} epochs are {steps} steps, but the run in {out} was set up for "
                             f"{run.train.total_steps}; a resumed run keeps its step count")
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, total_steps=steps))
    main = multihost.is_main_process()
    progress = progress and main
    if not resume and main:
        os.makedirs(out, exist_ok=True)
        files.write_text(os.path.join(out, RUN_FILE),
                      json.dumps({**run.to_dict(), FINGERPRINT: fingerprint}, indent=2, sort_keys=True) + "\n")

    mesh = None if tuple(run.mesh) == (1, 1, 1) else multihost.mesh_from_flag(run.mesh)  # (1, 1, 1): one device
    trainer = train.Trainer(config, run.train, dtype=run.dtype, mesh=mesh)
    # A quantized checkpoint of ours is read as it is stored. Float weights are quantized by ``init``; for
    # QLoRA they are read in the run's dtype, as ``cogvlm_jax.load(model, dtype, quantize=)`` reads them
    # (the same held base, and half the memory for a 16-bit run before the quantization).
    read_dtype = np.float32 if trainer.quant is None else model_dtype(run.dtype)
    params = read_params(run.model, config, read_dtype, mesh=mesh, progress=progress, quant=trainer.quant)
    state, frozen = trainer.init(params, seed=run.seed)
    del params  # the parameters now live in (state, frozen)
    done = checkpoint_steps(out)
    if resume and done:
        state = train.restore_state(checkpoint_dir(out, done[-1]), state)
    start, total = int(state.step), run.train.total_steps
    log_path = os.path.join(out, LOG_FILE)
    if main:
        _truncate_log(log_path, start)

    meta = {"run": run.to_dict()}
    log_file = open(log_path, "a") if main else contextlib.nullcontext()  # only process 0 logs
    with log_file as log, tqdm(total=total, initial=start, desc="train", unit="step", disable=not progress) as bar:
        host = batches.batch(start) if start < total else None
        for step in range(start, total):
            t0 = time.perf_counter()
            if step == start:  # the first step compiles the step program (a line says how long it took)
                bar.set_postfix_str("compiling the step")
            state, metrics = trainer.step(state, frozen, trainer.place_batch(host))
            host = batches.batch(step + 1) if step + 1 < total else None  # overlaps the device step
            m = jax.device_get(metrics)
            entry = {"step": step + 1, "epoch": step // batches.steps_per_epoch, "loss": float(m["loss"]),
                     "tokens": int(m["tokens"]), "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                     "seconds": round(time.perf_counter() - t0, 4)}
            if not np.isfinite(entry["loss"]):
                raise ValueError(f"loss is {entry['loss']} at step {step + 1}; lower --lr or check the data")
            if log is not None:
                log.write(json.dumps(entry) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            bar.update()
            if (step + 1) % save_every == 0 or step + 1 == total:
                train.save_state(checkpoint_dir(out, step + 1), state, meta, overwrite=True)  # all processes
                for old in checkpoint_steps(out)[:-keep] if main else ():
                    shutil.rmtree(checkpoint_dir(out, old), ignore_errors=True)
    if not export:
        return out
    return export_model(trainer, state, frozen, config, os.path.join(out, EXPORT), run.dtype,
                        export_files(run), progress)


def _check_quantized_model(run: RunConfig) -> None:
    """A model converted with ``--quantize`` trains only as the base of a QLoRA run of its own format."""
    stored = stored_quantization(run.model) if is_our_checkpoint(run.model) else None
    if stored is None:
        return
    tc = run.train
    if tc.quantize != stored.format or tc.quantize_vision != stored.vision:
        raise CheckpointError(
            f"{run.model} holds {stored.format}-quantized weights (quantize_vision={stored.vision}): it trains only as "
            f"the frozen base of LoRA with quantize={stored.format!r}{', quantize_vision' if stored.vision else ''} "
            f"(--trainable lora --quantize {stored.format}{' --quantize-vision' if stored.vision else ''}); this run "
            f"has trainable={tc.trainable!r}, quantize={tc.quantize!r}, quantize_vision={tc.quantize_vision}")


def export_model(trainer: train.Trainer, state: train.TrainState, frozen: Any, config, out_dir: str,
                 dtype: str = "float32", extra_files=(), progress: bool = True) -> str:
    """The full parameters (LoRA merged) as a Hugging Face checkpoint in ``dtype``; atomic, replaces
    ``out_dir``. Returns ``out_dir``. A QLoRA run's export is a float checkpoint: the dequantized base with
    the factors merged into it (``Trainer.params``). With several processes all call this; process 0 writes (see
    ``write_hf_checkpoint``)."""

    params = trainer.params(state, frozen)
    if jax.process_count() == 1:
        params = jax.device_get(params)  # else gathered one output file at a time
    return write_hf_checkpoint(params, config, out_dir, dtype=dtype, overwrite=True, extra_files=extra_files,
                               progress=progress)
