"""Training: the loss (mean cross-entropy over the answer tokens and eos), what is trained, AdamW with
warmup + cosine, and one jitted step.

The training signal is prompt + answer + eos, labels -100 on the prompt (``preprocess.build_inputs(...,
answer=...)`` makes them), and the mean next-token cross-entropy over the labelled positions: position
i's logits predict label i+1.

What is trained (``TrainConfig.trainable``):

* ``full``: every parameter.
* ``vision-expert``: CogVLM's own recipe: every decoder layer's vision expert (QKV with its bias, the
  attention output ``vision_expert_dense``, ``vision_mlp``) and the adapter between the ViT and the
  decoder (CogVLM2's 2x2 conv, the GLU ``linear_proj``, boi/eoi). The ViT and the language model stay.
* ``lora``: low-rank factors beside the chosen linear layers (``lora.py``); the base stays. With
  ``TrainConfig.quantize`` (QLoRA) the base is held as ``cogvlm_jax.load(..., quantize=)`` holds it: its
  kernels int8 or int4 (``models/quantize.py``), dequantized inside each product as in inference, never
  a float copy; the factors stay float32. The gradient reaches the factors only (the integers and their
  scales are constants of the step).

Parameters are split into ``trainable`` (float32 master copies, in the optimizer) and ``frozen`` (in the
compute dtype, never updated, no optimizer state): a frozen parameter is the same array after any
number of steps. On CPU a bfloat16 / float16 run keeps its frozen kernels rounded to that dtype but stored
in float32, widened once at init rather than in every step (XLA:CPU has no 16-bit matmul; the same
numbers, as ``api.weights_for_compute`` does for inference).

One step (:meth:`Trainer.step`, jitted, the state donated) takes a batch laid out as ``[accum, micro, ...]``
and scans over the ``accum`` micro-batches, summing each one's cross-entropy *sum* divided by the whole
batch's labelled-token count: the loss and gradient of the whole batch, not a mean of micro-batch means.
With a mesh, trainable parameters and their optimizer moments carry the parameters' shardings (fsdp and
tensor, as inference), and each micro-batch is split over the batch axes (``data``, ``fsdp``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict

from cogvlm_jax.convert import checkpoint, mapping
from cogvlm_jax.convert.checkpoint import CheckpointError, LazyArray, saver, tree_metadata
from cogvlm_jax.files import write_json
from cogvlm_jax.inputs.preprocess import IGNORE_INDEX as IGNORE  # label of a position not trained on
from cogvlm_jax.models import quantize as quant_lib
from cogvlm_jax.models.cogvlm import CogVLM, abstract_params, logical_axes
from cogvlm_jax.models.layers import widens_on_cpu
from cogvlm_jax.parallel import axes, program
from cogvlm_jax.parallel.multihost import atomic_directory, is_main_process, to_global
from cogvlm_jax.parallel.quantized import quantize_params
from cogvlm_jax.parallel.sharding import param_shardings, replicated
from cogvlm_jax.training import lora as lora_lib

TRAINABLE = ("full", "vision-expert", "lora")
BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "labels")


# =========================================================================== loss
def next_token_nll(logits, labels):
    """Summed cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` over labelled positions.

    logits: float [B, L, V]; labels: int [B, L] with ``IGNORE`` where there is nothing to learn.
    Returns (sum, number of labelled tokens). The log-softmax is taken in float32.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    target = labels[:, 1:]
    keep = target != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    return -jnp.where(keep, picked, 0.0).sum(), keep.sum()


def next_token_loss(logits, labels):
    """Mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` over labelled positions.

    Returns (loss, number of labelled tokens); see :func:`next_token_nll`.
    """
    total, count = next_token_nll(logits, labels)
    return total / jnp.maximum(count, 1), count


def loss_fn(module: CogVLM, params, batch):
    """The training loss of ``batch`` (a dict with input_ids, token_type_ids, attention_mask, labels and,
    if there are images, pixel_values) under ``params``. Returns (loss, number of labelled tokens)."""
    logits, _, _ = module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                                batch["attention_mask"], batch.get("pixel_values"))
    return next_token_loss(logits, batch["labels"])


# =========================================================================== settings
def check_field_types(settings, where: str = "") -> None:
    """Every field of the dataclass ``settings`` of the type its annotation names: an ``int`` field holds an
    int (not a bool, a float or a string), a ``float`` field a finite number, a ``bool`` field a bool, a
    ``str`` one a string (``Optional``: or None), a ``tuple[str, ...]`` strings (as a run.json or a caller
    gives them, nothing is coerced). A ``ValueError`` names the first field that is not."""
    for f in dataclasses.fields(settings):
        kind, value = str(f.type), getattr(settings, f.name)
        if kind.startswith("Optional[") and value is None:
            continue
        kind = kind.removeprefix("Optional[").removesuffix("]")
        if kind == "int":  # numbers.Integral: numpy's ints too
            ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
        elif kind == "float":
            ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "str":
            ok = isinstance(value, str)
        elif kind.startswith("tuple[str"):
            ok = isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        elif kind.startswith("tuple[int"):
            ok = isinstance(value, tuple) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                                  for v in value)
        else:
            continue
        if not ok:
            want = {"int": "an int", "float": "a finite number", "bool": "true or false", "str": "a string"}.get(
                kind, "a list of strings" if kind.startswith("tuple[str") else "a list of ints")
            raise ValueError(f"{where}{f.name} must be {want}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that changes the numbers of a step (a resumed run must use the same)."""

    trainable: str = "full"             # full | vision-expert | lora
    learning_rate: float = 1e-4         # peak, reached at the end of warmup
    warmup_steps: int = 0
    total_steps: int = 1000             # the run's length; the cosine reaches end_lr_ratio * lr one step after
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0           # decoupled (AdamW), on kernels, embeddings and LoRA factors only
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0          # global-norm clipping; 0 disables
    accum: int = 1                      # micro-batches per step
    remat: bool = False                 # recompute each decoder layer / ViT block in the backward pass
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = lora_lib.DEFAULT_TARGETS
    quantize: Optional[str] = None      # lora only: the frozen base held as int8 / int4 (QLoRA)
    quantize_vision: bool = False       # with quantize: the ViT's kernels too

    def __post_init__(self):
        check_field_types(self, "train.")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable {self.trainable!r} unknown; expected one of {', '.join(TRAINABLE)}")
        if self.quantize is not None and self.quantize not in quant_lib.FORMATS:
            raise ValueError(f"train.quantize must be one of {', '.join(quant_lib.FORMATS)} or null, "
                             f"got {self.quantize!r}")
        if self.quantize is not None and self.trainable != "lora":
            raise ValueError(f"quantize={self.quantize!r} holds the frozen base in {self.quantize}: only LoRA trains "
                             f"beside a quantized base ({self.trainable!r} updates the kernels themselves); use "
                             "trainable='lora' (--trainable lora)")
        if self.quantize_vision and self.quantize is None:
            raise ValueError("quantize_vision needs quantize='int8' or 'int4'")
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, got total_steps "
                             f"{self.total_steps}, warmup_steps {self.warmup_steps}")
        if self.accum < 1:
            raise ValueError(f"accum must be >= 1, got {self.accum}")
        if self.learning_rate <= 0 or not 0 <= self.end_lr_ratio <= 1:
            raise ValueError(f"need learning_rate > 0 and 0 <= end_lr_ratio <= 1, got {self.learning_rate}, "
                             f"{self.end_lr_ratio}")
        checks = {"weight_decay": self.weight_decay >= 0, "max_grad_norm": self.max_grad_norm >= 0,  # 0: no clip
                  "eps": self.eps > 0, "b1": 0 <= self.b1 < 1, "b2": 0 <= self.b2 < 1, "lora_rank": self.lora_rank >= 1}
        bad = [f"{name} {getattr(self, name)}" for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"bad optimizer settings: {', '.join(bad)} (need weight_decay >= 0, max_grad_norm >= 0 "
                             "(0: no clipping), eps > 0, 0 <= b1, b2 < 1, lora_rank >= 1)")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrainConfig":
        d = dict(d)
        d["lora_targets"] = tuple(d.get("lora_targets", lora_lib.DEFAULT_TARGETS))
        return cls(**d)


def lr_schedule(cfg: TrainConfig):
    """Learning rate of the update with optax count ``t`` (the (t+1)-th step); every step of the run has lr > 0.

    Linear warmup ``lr * (t + 1) / warmup`` for the first ``warmup_steps`` steps (no step with lr 0), reaching
    the peak ``lr`` at step ``max(warmup_steps, 1)``; then a cosine from the peak down towards
    ``end_lr_ratio * lr``, which it reaches one step after the last (step ``total_steps + 1``), so that the
    last step still trains (a one-step run trains at the peak). The cosine's factor is computed as
    ``sin(pi / 2 * left) ** 2`` of the fraction ``left`` of the decay still ahead: it stays above 0 in float32
    however long the run (``(1 + cos(pi * progress)) / 2`` rounds to 0 near the end of a long one).
    """
    peak, warm, total = cfg.learning_rate, cfg.warmup_steps, cfg.total_steps
    end = peak * cfg.end_lr_ratio
    top = max(warm, 1)  # the step at the peak
    span = total + 1 - top  # steps from the peak to where the cosine ends, one past the last

    def schedule(count):
        step = jnp.asarray(count, jnp.float32) + 1.0  # 1-based step number
        warmup = peak * step / max(warm, 1)
        left = jnp.clip((total + 1 - step) / span, 0.0, 1.0)  # 1 at the peak, 1 / span at the last step
        cosine = end + (peak - end) * jnp.sin(0.5 * math.pi * left) ** 2
        return jnp.where(step <= warm, warmup, cosine)
    return schedule


def _decays(path: tuple) -> bool:
    return path[-1] in ("kernel", "embedding", lora_lib.A, lora_lib.B)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with :func:`lr_schedule` (decay on matrices, not norms/biases)."""
    def decay_mask(tree):
        return unflatten_dict({p: _decays(p) for p in flatten_dict(tree)})
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw) if cfg.max_grad_norm > 0 else adamw


# =========================================================================== what is trained
def is_vision_expert(path: tuple) -> bool:
    """True for the parameters CogVLM trains in its own recipe: the decoder's vision expert + the adapter."""
    if path[0] == "vision":
        return path[1] not in ("patch_embedding", "transformer")  # conv, linear_proj (GLU), boi, eoi
    return any(name.startswith("vision_expert_") or name == "vision_mlp" for name in path)


def trainable_mask(params: Mapping, mode: str) -> dict:
    """Nested dict of bools like ``params``: True where ``mode`` (full | vision-expert) trains the leaf."""
    if mode not in ("full", "vision-expert"):
        raise ValueError(f"trainable_mask covers full and vision-expert; {mode!r} has its own parameters")
    return unflatten_dict({p: mode == "full" or is_vision_expert(p) for p in flatten_dict(params)})


def split(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
    """(leaves where ``mask`` is True, the others), each a nested dict with only its leaves."""
    m = flatten_dict(mask)
    flat = flatten_dict(tree)
    return (unflatten_dict({p: v for p, v in flat.items() if m[p]}),
            unflatten_dict({p: v for p, v in flat.items() if not m[p]}))


def combine(a: Mapping, b: Mapping) -> dict:
    """The union of two nested dicts with disjoint leaves (the inverse of :func:`split`)."""
    flat = flatten_dict(a)
    for p, v in flatten_dict(b).items():
        if p in flat:
            raise ValueError(f"parameter {'/'.join(p)} is in both trees")
        flat[p] = v
    return unflatten_dict(flat)


# =========================================================================== state and step
@flax.struct.dataclass
class TrainState:
    """What a checkpoint holds: ``step`` (int32, updates done), ``trainable`` (float32 parameters or LoRA
    factors), ``opt_state`` (optax, only for ``trainable``), ``rng`` (the per-step key: split every step,
    its subkey given to the model as the ``dropout`` stream)."""

    step: Any
    trainable: Any
    opt_state: Any
    rng: Any


class Trainer:
    """A model (config + flax module), a :class:`TrainConfig` and optionally a mesh; pure in the state.

    ``init(params, seed)`` -> (state, frozen); ``step(state, frozen, batch)`` -> (state, metrics);
    ``params(state, frozen)`` -> the full parameter tree (LoRA merged), e.g. for export.

    ``module`` is the model as any caller applies it, built for the mesh (``program.execution``, in the
    exact layout);
    ``step_module`` is the one the step applies: on CPU a 16-bit run's, whose float32 kernels are the
    frozen ones ``init`` widened (``Execution.widened_kernels``), else ``module`` itself.
    """

    def __init__(self, config, train_config: TrainConfig, dtype=jnp.float32, mesh=None, vit_query_chunk=None):
        if mesh is None and jax.process_count() > 1:
            raise ValueError(f"training with {jax.process_count()} processes needs a mesh over their devices "
                             "(e.g. cogvlm_jax.make_mesh(1, processes, devices per process))")
        if train_config.trainable == "vision-expert" and not config.text.vision_expert:
            name = config.name or "this model"
            raise ValueError(f"trainable 'vision-expert' needs a decoder with a vision expert; {name} has none "
                             "(CogVLM2-Video): use full or lora")
        self.config = config
        self.tc = train_config
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh
        self._key = (config, train_config, self.dtype.name, mesh, vit_query_chunk)
        # the exact layout on every platform: the trained parameters, LoRA factors and optimizer state are
        # then in checkpoint order, as saved, exported and resumed (the Megatron layout holds the fused
        # QKV rows head-grouped, parallel/layout.py)
        execution = program.execution(mesh, "exact")
        # QLoRA: the frozen base held quantized, the module's products dequantizing it (``models/quantize.py``)
        self.quant = quant_lib.make(train_config.quantize, train_config.quantize_vision, execution.platform)
        execution = execution.replace(quant=self.quant)
        self.module = CogVLM(config, self.dtype, vit_query_chunk, remat=train_config.remat, execution=execution)
        # XLA:CPU multiplies 16-bit weights by widening them to float32: frozen kernels are widened once, at
        # init, not in every step; same numbers, twice their memory. The step's module takes float32 kernels
        # as widened already (``Execution.widened_kernels``).
        self.widen_frozen = widens_on_cpu(self.dtype, execution.platform)
        self.step_module = (self.module.clone(execution=execution.replace(widened_kernels=True))
                            if self.widen_frozen else self.module)
        self.optimizer = make_optimizer(train_config)
        self.schedule = lr_schedule(train_config)
        self._step = None

    # ------------------------------------------------------------------ forward
    def _nll(self, trainable, frozen, batch, rng):
        """(summed cross-entropy, labelled tokens) of one micro-batch."""
        rngs = {"dropout": rng}
        args = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch.get("pixel_values"))
        if self.tc.trainable == "lora":
            with lora_lib.applied(self.tc.lora_scale):
                logits = self.step_module.apply({"params": frozen, lora_lib.COLLECTION: trainable}, *args,
                                                rngs=rngs)[0]
        else:
            # float32 kernels count as widened in the step's module: the trained ones enter rounded to the
            # dtype (the same converts as the module's own rounding, so the same values and gradients)
            params = combine(self._kernels_as(trainable, self.dtype) if self.widen_frozen else trainable, frozen)
            logits = self.step_module.apply({"params": params}, *args, rngs=rngs)[0]
        return next_token_nll(logits, batch["labels"])

    @staticmethod
    def _kernels_as(tree, dtype):
        """``tree`` with its float ``kernel`` leaves (the weights of ``Dense`` / ``PatchConv``) cast to ``dtype``;
        quantized kernels (integers) stay as they are held."""
        return unflatten_dict({p: a.astype(dtype) if p[-1] == "kernel" and jnp.issubdtype(a.dtype, jnp.floating)
                               else a for p, a in flatten_dict(tree).items()})

    def loss_and_grads(self, trainable, frozen, batch, rng=None):
        """Loss and gradient (w.r.t. ``trainable``) of a whole ``[accum, micro, ...]`` batch: the micro-batches'
        cross-entropy sums over the batch's labelled-token count. Returns (loss, tokens, grads)."""
        rng = jax.random.PRNGKey(0) if rng is None else rng
        tokens = (batch["labels"][..., 1:] != IGNORE).sum()
        denom = jnp.maximum(tokens, 1).astype(jnp.float32)
        constrain = self._constrain_like_trainable

        def micro(carry, xs):
            grads, loss = carry
            i, mb = xs
            value, g = jax.value_and_grad(lambda t: self._nll(t, frozen, mb, jax.random.fold_in(rng, i))[0] / denom)(
                trainable)
            grads = constrain(jax.tree.map(jnp.add, grads, g))
            return (grads, loss + value), None

        zeros = constrain(jax.tree.map(jnp.zeros_like, trainable))
        n = batch["labels"].shape[0]
        (grads, loss), _ = jax.lax.scan(micro, (zeros, jnp.float32(0.0)), (jnp.arange(n), batch))
        return loss, tokens, grads

    def _constrain_like_trainable(self, tree):
        if self.mesh is None:
            return tree
        return jax.lax.with_sharding_constraint(tree, self._trainable_shardings)

    # ------------------------------------------------------------------ state
    def init(self, params: Mapping, seed: int = 0) -> tuple[TrainState, dict]:
        """Split ``params`` by the trainable mode (LoRA: new factors from ``seed``), build the optimizer state
        and place everything on the mesh. Returns (state, frozen)."""
        rng = jax.random.PRNGKey(seed)
        if self.tc.trainable == "lora":
            trainable = lora_lib.init(self._float_shapes(params), self.tc.lora_targets, self.tc.lora_rank,
                                      jax.random.fold_in(rng, 1))
            frozen = params
            if self.quant is not None:  # each float kernel quantized (one leaf at a time); held ones kept
                frozen = quantize_params(params, self.config, self.quant, self.mesh)
        else:
            trainable, frozen = split(params, trainable_mask(params, self.tc.trainable))
        # Casts are elementwise, so sharded inputs stay sharded (no device ever holds a whole model). The
        # trainable arrays are copied (may_alias=False): the step donates them, and they must not be the caller's.
        # A quantized base keeps its integers and float32 scales as they are held.
        trainable = jax.tree.map(lambda a: jnp.asarray(a).astype(jnp.float32), trainable)
        frozen = unflatten_dict({p: jnp.asarray(a) if _held_as_is(p, a) else jnp.asarray(a).astype(self.dtype)
                                 for p, a in flatten_dict(frozen).items()})
        if self.widen_frozen:
            frozen = self._kernels_as(frozen, jnp.float32)
        self._set_shardings(trainable)
        if self.mesh is None:
            # committed to the device, like a restored state: the step then compiles once for both
            device = jax.devices()[0]
            trainable = jax.device_put(trainable, device, may_alias=False)
            frozen = jax.device_put(frozen, device)
            opt_state = jax.jit(self.optimizer.init)(trainable)
        else:
            trainable = jax.device_put(trainable, self._trainable_shardings, may_alias=False)
            frozen = jax.device_put(frozen, self._frozen_shardings(frozen))
            opt_state = jax.jit(self.optimizer.init, out_shardings=self._opt_shardings(trainable))(trainable)
        state = TrainState(step=jnp.int32(0), trainable=trainable, opt_state=opt_state, rng=rng)
        return jax.device_put(state, device if self.mesh is None else self.state_shardings(state)), frozen

    def _float_shapes(self, params: Mapping):
        """``params`` for sizing the LoRA factors: a quantized kernel (held int4 packs two inputs per byte)
        replaced by its float kernel's shape, every other leaf as it is, in ``params``' own order."""
        if self.quant is None:
            return params
        floats = flatten_dict(abstract_params(self.config))
        flat = flatten_dict(params)
        return unflatten_dict({p: floats[p] if p[-1] == "kernel" and p[:-1] + (quant_lib.SCALE,) in flat else a
                               for p, a in flat.items()})

    def _abstract_trainable(self):
        """The tree of trainable leaves :meth:`init` makes, as float32 shapes, from the config alone."""
        params = abstract_params(self.config)
        if self.tc.trainable == "lora":
            return jax.eval_shape(lambda: lora_lib.init(params, self.tc.lora_targets, self.tc.lora_rank,
                                                        jax.random.PRNGKey(0)))
        return split(params, trainable_mask(params, self.tc.trainable))[0]

    def abstract_init(self, params: Mapping, seed: int = 0) -> tuple[TrainState, dict]:
        """What :meth:`init` returns, as ``jax.ShapeDtypeStruct`` s carrying the shardings it places them with
        (a mesh is needed): ``params`` may be abstract too. Nothing is allocated; ahead-of-time compilation
        (``cogvlm_jax.aot``) lowers :meth:`step_program` with these."""
        if self.mesh is None:
            raise ValueError("abstract_init needs a Trainer with a mesh")
        state, frozen = jax.eval_shape(lambda p: self.init(p, seed), params)
        with_sharding = lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)  # noqa: E731
        return (jax.tree.map(with_sharding, state, self.state_shardings(state)),
                jax.tree.map(with_sharding, frozen, self._frozen_shardings(frozen)))

    def _set_shardings(self, trainable):
        if self.mesh is None:
            self._trainable_shardings = None
            return

        if self.tc.trainable == "lora":
            names = lora_lib.axes_of(trainable, logical_axes(self.config))
            self._trainable_shardings = jax.tree.map(
                lambda a, n: axes.named_sharding(tuple(n), a.shape, self.mesh), trainable, names,
                is_leaf=lambda x: isinstance(x, tuple))
        else:
            every = flatten_dict(param_shardings(self.config, self.mesh))
            self._trainable_shardings = unflatten_dict({p: every[p] for p in flatten_dict(trainable)})

    def _frozen_shardings(self, frozen):
        every = flatten_dict(param_shardings(self.config, self.mesh, quant=self.quant))
        return unflatten_dict({p: every[p] for p in flatten_dict(frozen)})

    def _opt_shardings(self, trainable):
        if self.mesh is None:
            return None

        abstract = jax.eval_shape(self.optimizer.init, trainable)
        return optax.tree_map_params(self.optimizer, lambda _, s: s, abstract, self._trainable_shardings,
                                     transform_non_params=lambda _: replicated(self.mesh))

    def state_shardings(self, state: TrainState) -> Optional[TrainState]:
        """A TrainState of NamedShardings (None without a mesh)."""
        if self.mesh is None:
            return None

        rep = replicated(self.mesh)
        return TrainState(step=rep, trainable=self._trainable_shardings,
                          opt_state=self._opt_shardings(state.trainable), rng=rep)

    # ------------------------------------------------------------------ step
    def place_batch(self, batch: Mapping) -> dict:
        """A host batch of ``accum * micro`` rows -> device arrays ``[accum, micro, ...]``, each micro-batch
        split over the mesh's batch axes. ``pixel_values`` None is dropped (a text-only batch).

        With several processes every process passes the same whole host batch (``data.Batches`` makes it
        from (seed, step) alone) and places only the rows its own devices hold."""
        a = self.tc.accum
        out = {}
        for key, value in batch.items():
            if value is None:
                continue
            value = np.asarray(value)
            if value.shape[0] % a:
                raise ValueError(f"batch of {value.shape[0]} rows does not split into accum={a} micro-batches")
            value = value.reshape(a, value.shape[0] // a, *value.shape[1:])
            if self.mesh is None:
                out[key] = jax.device_put(value, jax.devices()[0])
            else:
                out[key] = to_global(value, self.batch_sharding(value.shape))  # each process puts its own devices' rows
        return out

    def batch_sharding(self, shape):
        """The sharding of a placed ``[accum, micro, ...]`` batch array (a mesh is needed): each micro-batch
        split over the mesh's batch axes."""
        return axes.named_sharding((None, "batch") + (None,) * (len(shape) - 2), tuple(shape), self.mesh)

    def _step_fn(self, state: TrainState, frozen, batch):
        rng, key = jax.random.split(state.rng)
        loss, tokens, grads = self.loss_and_grads(state.trainable, frozen, batch, key)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": optax.tree.norm(grads),
                   "lr": self.schedule(state.step)}
        return TrainState(state.step + 1, trainable, opt_state, rng), metrics

    def step(self, state: TrainState, frozen, batch: Mapping):
        """One optimizer update on a batch from :meth:`place_batch`. ``state`` is donated (do not reuse it).
        Returns (new state, metrics: loss, tokens, grad_norm, lr of this step)."""
        return self.step_program(state)(state, frozen, batch)

    def step_program(self, state: TrainState):
        """The jitted step :meth:`step` runs (its output shardings follow ``state``'s structure)."""
        if self._step is None:
            self._step = _jitted_step(*self._key)
        return self._step

    def params(self, state: TrainState, frozen) -> dict:
        """The full parameter tree: trainable leaves in float32 (LoRA merged into the frozen kernels), frozen
        ones in the compute dtype.

        A quantized base (QLoRA) comes back as a float tree in the compute dtype: each held kernel
        dequantized (``quant_lib.dequantize``, one leaf at a time, in float32), the factors merged into it,
        then rounded to the dtype. It is the function the run trained (up to float rounding); the
        integers cannot take the merged update without rounding it away, so no quantized tree is made
        here (``cogvlm_jax.load(..., quantize=)`` quantizes an export again, update included)."""
        if self.widen_frozen:
            frozen = self._kernels_as(frozen, self.dtype)
        if self.quant is not None:
            frozen = self._dequantized(frozen)
        if self.tc.trainable == "lora":
            merged = lora_lib.merge(frozen, state.trainable, self.tc.lora_scale)
            return merged if self.quant is None else self._kernels_as(merged, self.dtype)
        return combine(state.trainable, frozen)

    def _dequantized(self, frozen) -> dict:
        """``frozen`` with each quantized kernel replaced by its float32 dequantization, its scales dropped."""
        flat = flatten_dict(frozen)
        for path in [p[:-1] + ("kernel",) for p in flat if p[-1] == quant_lib.SCALE]:
            scale = flat.pop(path[:-1] + (quant_lib.SCALE,))
            flat[path] = _dequantizer(quant_lib.in_axis_of(path), self.quant)(flat[path], scale)
        return unflatten_dict(flat)


def _held_as_is(path: tuple, a) -> bool:
    """A leaf of a quantized base kept in the form it is held in: integers and their float32 scales."""
    return not jnp.issubdtype(a.dtype, jnp.floating) or path[-1] == quant_lib.SCALE


@functools.lru_cache(maxsize=None)
def _dequantizer(in_axis: int, quant: quant_lib.Quantization):
    return jax.jit(functools.partial(quant_lib.dequantize, in_axis=in_axis, quant=quant, dtype=jnp.float32))


@functools.lru_cache(maxsize=8)
def _jitted_step(config, train_config: TrainConfig, dtype: str, mesh, vit_query_chunk):
    """The jitted step of a :class:`Trainer` built with these arguments.

    A function of them alone: it builds its own Trainer and takes the shardings from the parameter shapes
    the config gives, so Trainers with the same model, settings and mesh run one compiled step."""
    tr = Trainer(config, train_config, dtype, mesh, vit_query_chunk)
    out = None
    if mesh is not None:
        trainable = tr._abstract_trainable()
        tr._set_shardings(trainable)
        # metrics replicated: every process can read them (several processes: each holds a copy)
        out = (tr.state_shardings(TrainState(None, trainable, None, None)), replicated(mesh))
    return program.jit(tr._step_fn, mesh, donate_argnums=0, out_shardings=out, describe=_describe_step)


def _describe_step(state, frozen, batch) -> str:
    *_, b, n = batch["input_ids"].shape  # [accum, rows, length]
    accum = batch["input_ids"].shape[0] if batch["input_ids"].ndim == 3 else 1
    images = ", images" if batch.get("pixel_values") is not None else ""
    return f"train step ({accum} x {b} x {n} tokens{images})"


# =========================================================================== checkpoints of the state
STATE_DIR = "state"
META_FILE = "train.json"


def is_training_checkpoint(path: str) -> bool:
    """True for a directory :func:`save_state` wrote (``train.json`` and an Orbax ``state/``)."""
    return os.path.isfile(os.path.join(path, META_FILE)) and os.path.isdir(os.path.join(path, STATE_DIR))


def _state_tree(state: TrainState) -> dict:
    """The state as nested dicts of arrays (optimizer leaves numbered in their tree order), for Orbax."""
    leaves = jax.tree.leaves(state.opt_state)
    return {"step": state.step, "rng": state.rng, "trainable": state.trainable,
            "opt_state": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}}


def _in_row_blocks(params: Mapping) -> dict:
    """``params`` with each array larger than ``checkpoint.BLOCK_BYTES`` as a :class:`LazyArray` that copies
    itself to the host a region at a time: stored in chunks of its shard on the mesh, cut along the axis
    that holds the HF tensor's rows (``cogvlm_jax.convert.mapping.rows_axis``) so that a band of them across the whole
    leaf fits BLOCK_BYTES, so exporting the checkpoint reads it in row blocks (``checkpoint.block_reader``).
    Smaller arrays, and a whole array where the host has not every shard (several processes), are left as
    they are (one chunk per shard)."""
    def leaf(path, a):
        a = jnp.asarray(a)
        if a.ndim == 0 or a.nbytes <= checkpoint.BLOCK_BYTES or not a.is_fully_addressable:
            return a
        try:
            axis = mapping.rows_axis(mapping.transform_of(path), a.ndim)
        except CheckpointError:  # not a model parameter (LoRA factors): its first axis
            axis = 0
        chunks = list(a.sharding.shard_shape(a.shape))
        if chunks == list(a.shape):
            chunks = None  # LazyArray cuts it in row blocks
        else:  # whole-width bands of chunks that tile the shards and fit BLOCK_BYTES
            rows = checkpoint.block_rows(tuple(a.shape), a.dtype.itemsize, axis)
            chunks[axis] = max(d for d in range(1, min(rows, chunks[axis]) + 1) if chunks[axis] % d == 0)
        return LazyArray(tuple(a.shape), np.dtype(a.dtype), lambda: np.asarray(a),
                         region=lambda index: np.asarray(a[index]), block_axis=axis,
                         chunks=None if chunks is None else tuple(chunks))

    return unflatten_dict({p: leaf(p, a) for p, a in flatten_dict(params).items()})


def save_state(path: str, state: TrainState, meta: Optional[Mapping] = None, overwrite: bool = False) -> str:
    """Write ``state`` (Orbax, under ``path/state``) and ``meta`` (``path/train.json``) atomically: the
    directory appears complete or not at all. Returns ``path``.

    With several processes every process calls this (a collective): each writes the shards its devices
    hold, process 0 writes ``train.json`` and renames the directory into place, and all return once it is
    there. ``path`` must be on storage every process sees."""

    with atomic_directory(path, overwrite) as tmp:
        tree = _state_tree(state)
        if jax.process_count() == 1:
            # large parameters stored in row blocks, so an export reads them a block at a time

            tree["trainable"] = _in_row_blocks(tree["trainable"])
            with saver() as save:
                save(os.path.join(tmp, STATE_DIR), tree)
        else:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(os.path.join(tmp, STATE_DIR), tree)
                ckptr.wait_until_finished()
        if is_main_process():
            write_json(os.path.join(tmp, META_FILE), dict(meta or {}, step=int(state.step)))
    return path


def restore_state(path: str, like: TrainState) -> TrainState:
    """Read a state written by :func:`save_state` into the structure, dtypes and shardings of ``like`` (a
    state from :meth:`Trainer.init` of the same model and settings, or its ``jax.ShapeDtypeStruct`` s).
    With several processes every process calls this, and each reads the shards its devices hold."""

    where = os.path.join(path, STATE_DIR)
    if not os.path.isdir(where):
        raise CheckpointError(f"{path} is not a training checkpoint (no {STATE_DIR}/ directory)")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract(a):
        sharding = getattr(a, "sharding", None) or device
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    target = jax.tree.map(abstract, _state_tree(like))
    with ocp.StandardCheckpointer() as ckptr:
        have = {k: tuple(v.shape) for k, v in flatten_dict(tree_metadata(where), sep="/").items()}
        want = {k: tuple(v.shape) for k, v in flatten_dict(target, sep="/").items()}
        if have != want:
            diff = sorted(set(have) ^ set(want)) + sorted(k for k in set(have) & set(want) if have[k] != want[k])
            raise CheckpointError(f"training checkpoint {path} does not match this model and these settings "
                                  f"(trainable / LoRA targets and rank must be the same); differing: "
                                  + ", ".join(diff[:8]))
        tree = ckptr.restore(where, target)
    opt_def = jax.tree.structure(like.opt_state)
    opt_state = jax.tree.unflatten(opt_def, [tree["opt_state"][k] for k in sorted(tree["opt_state"])])
    return TrainState(step=tree["step"], trainable=tree["trainable"], opt_state=opt_state, rng=tree["rng"])
