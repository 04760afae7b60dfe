"""The one table between Hugging Face CogVLM/CogVLM2 weight names and our parameter tree.

Each rule reads as a rename plus a layout change:

* ``"transpose"``: a PyTorch linear weight ``[out, in]`` becomes our ``kernel [in, out]`` (the ViT and
  the adapter);
* ``"conv"``: a PyTorch conv weight ``[out, in, kh, kw]`` becomes our ``kernel [kh, kw, in, out]``;
* ``"none"``: same layout: the decoder layers' linears and the lm_head (stored ``[out, in]`` as in
  PyTorch, see ``layers.Dense(out_in=True)``), norm weights, biases, embeddings, boi/eoi, cls/position embeddings;
* ``"buffer"``: ``rotary_emb.inv_freq``, a buffer the reference saves with the weights. It is not a
  parameter here: it is checked on import and recomputed on export (:func:`rotary_inv_freq`).

Shapes are written with the symbols of :func:`_dims` (HF layout, i.e. before the transform), so the
table also says what a complete checkpoint of a given config must hold (:func:`expected_hf_keys`).
Layer rules carry ``{i}``; they expand over the text or the vision layers.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence

import numpy as np

from cogvlm_jax.config import CogVLMConfig
from cogvlm_jax.convert.checkpoint import CheckpointError

TRANSPOSE, CONV, NONE, BUFFER = "transpose", "conv", "none", "buffer"

Path = tuple  # our parameter path, e.g. ("layers_0", "mlp", "language_mlp", "up_proj", "kernel")


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str                  # HF name template, "{i}" = layer index
    ours: str | None         # our path template, "/"-separated; None for buffers
    transform: str           # TRANSPOSE | CONV | NONE | BUFFER
    shape: tuple[str, ...]   # HF shape, in the symbols of _dims()
    layers: str | None = None  # "text" | "vision": what {i} runs over
    when: str | None = None    # name of a _CONDITIONS predicate; the key exists only if it holds
    optional: bool = False     # a checkpoint may lack it (recomputable buffers)

    def hf_regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")

    def ours_regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.ours).replace(r"\{i\}", r"(\d+)") + "$")


def _text_layer(name: str, ours: str | None, transform: str, shape: tuple[str, ...], **kw) -> Rule:
    return Rule(f"model.layers.{{i}}.{name}", ours and f"layers_{{i}}/{ours}", transform, shape, "text", **kw)


def _vision_layer(name: str, ours: str, transform: str, shape: tuple[str, ...]) -> Rule:
    return Rule(f"model.vision.transformer.layers.{{i}}.{name}", f"vision/transformer/layers_{{i}}/{ours}",
                transform, shape, "vision")


def _vision_layer_linear(name: str, out: str, inp: str) -> list[Rule]:
    return [_vision_layer(f"{name}.weight", f"{name.replace('.', '/')}/kernel", TRANSPOSE, (out, inp)),
            _vision_layer(f"{name}.bias", f"{name.replace('.', '/')}/bias", NONE, (out,))]


def _vision_layer_norm(name: str) -> list[Rule]:
    return [_vision_layer(f"{name}.weight", f"{name}/scale", NONE, ("Dv",)),
            _vision_layer(f"{name}.bias", f"{name}/bias", NONE, ("Dv",))]


def _expert_mlps() -> list[Rule]:
    rules = []
    for expert, when in (("language_mlp", None), ("vision_mlp", "vision_expert")):
        for proj, shape in (("gate_proj", ("F", "D")), ("up_proj", ("F", "D")), ("down_proj", ("D", "F"))):
            rules.append(_text_layer(f"mlp.{expert}.{proj}.weight", f"mlp/{expert}/{proj}/kernel", NONE, shape,
                                     when=when))
    return rules


RULES: tuple[Rule, ...] = (
    # ---- vision tower: patch embedding ----
    Rule("model.vision.patch_embedding.proj.weight", "vision/patch_embedding/proj/kernel", CONV, ("Dv", "C", "P", "P")),
    Rule("model.vision.patch_embedding.proj.bias", "vision/patch_embedding/proj/bias", NONE, ("Dv",)),
    Rule("model.vision.patch_embedding.cls_embedding", "vision/patch_embedding/cls_embedding", NONE, ("1", "Dv")),
    Rule("model.vision.patch_embedding.position_embedding.weight", "vision/patch_embedding/position_embedding",
         NONE, ("N", "Dv")),
    # ---- vision tower: post-norm transformer blocks ----
    *_vision_layer_norm("input_layernorm"),
    *_vision_layer_linear("attention.query_key_value", "3Dv", "Dv"),
    *_vision_layer_linear("attention.dense", "Dv", "Dv"),
    *_vision_layer_linear("mlp.fc1", "Fv", "Dv"),
    *_vision_layer_linear("mlp.fc2", "Dv", "Fv"),
    *_vision_layer_norm("post_attention_layernorm"),
    # ---- CogVLM2's 2x2 stride-2 downsample ----
    Rule("model.vision.conv.weight", "vision/conv/kernel", CONV, ("Dv", "Dv", "2", "2"), when="downsample"),
    Rule("model.vision.conv.bias", "vision/conv/bias", NONE, ("Dv",), when="downsample"),
    # ---- GLU adapter and the image delimiters ----
    Rule("model.vision.linear_proj.linear_proj.weight", "vision/linear_proj/linear_proj/kernel", TRANSPOSE, ("D", "Dv")),
    Rule("model.vision.linear_proj.norm1.weight", "vision/linear_proj/norm1/scale", NONE, ("D",)),
    Rule("model.vision.linear_proj.norm1.bias", "vision/linear_proj/norm1/bias", NONE, ("D",)),
    Rule("model.vision.linear_proj.gate_proj.weight", "vision/linear_proj/gate_proj/kernel", TRANSPOSE, ("F", "D")),
    Rule("model.vision.linear_proj.dense_h_to_4h.weight", "vision/linear_proj/dense_h_to_4h/kernel", TRANSPOSE, ("F", "D")),
    Rule("model.vision.linear_proj.dense_4h_to_h.weight", "vision/linear_proj/dense_4h_to_h/kernel", TRANSPOSE, ("D", "F")),
    Rule("model.vision.boi", "vision/boi", NONE, ("1", "1", "D")),
    Rule("model.vision.eoi", "vision/eoi", NONE, ("1", "1", "D")),
    # ---- language model ----
    Rule("model.embed_tokens.weight", "embed_tokens/embedding", NONE, ("V", "D")),
    _text_layer("input_layernorm.weight", "input_layernorm/scale", NONE, ("D",)),
    _text_layer("post_attention_layernorm.weight", "post_attention_layernorm/scale", NONE, ("D",)),
    _text_layer("self_attn.language_expert_query_key_value.weight", "self_attn/language_expert_query_key_value/kernel",
                NONE, ("QKV", "D")),
    _text_layer("self_attn.vision_expert_query_key_value.weight", "self_attn/vision_expert_query_key_value/kernel",
                NONE, ("QKV", "D"), when="vision_expert"),
    _text_layer("self_attn.vision_expert_query_key_value.bias", "self_attn/vision_expert_query_key_value/bias",
                NONE, ("QKV",), when="vision_qkv_bias"),
    _text_layer("self_attn.language_expert_dense.weight", "self_attn/language_expert_dense/kernel", NONE, ("D", "HE")),
    _text_layer("self_attn.vision_expert_dense.weight", "self_attn/vision_expert_dense/kernel", NONE, ("D", "HE"),
                when="vision_expert"),
    *_expert_mlps(),
    _text_layer("self_attn.rotary_emb.inv_freq", None, BUFFER, ("E/2",), optional=True),
    Rule("model.norm.weight", "norm/scale", NONE, ("D",)),
    Rule("lm_head.weight", "lm_head/kernel", NONE, ("V", "D"), when="untied"),
)

_CONDITIONS = {
    "downsample": lambda c: c.vision.downsample,
    "vision_qkv_bias": lambda c: c.text.vision_expert and c.text.vision_qkv_bias,
    "vision_expert": lambda c: c.text.vision_expert,  # CogVLM2-Video's decoder has the language expert alone
    "untied": lambda c: not c.tie_word_embeddings,
}

_HF_REGEXES = [(r.hf_regex(), r) for r in RULES]
_OURS_REGEXES = [(r.ours_regex(), r) for r in RULES if r.ours is not None]


def _dims(c: CogVLMConfig) -> dict[str, int]:
    t, v = c.text, c.vision
    return {
        "D": t.hidden_size, "F": t.intermediate_size, "V": t.vocab_size, "QKV": t.qkv_size,
        "HE": t.num_heads * t.head_dim, "E/2": t.head_dim // 2,
        "Dv": v.hidden_size, "3Dv": 3 * v.hidden_size, "Fv": v.intermediate_size, "C": v.in_channels,
        "P": v.patch_size, "N": v.num_patches + 1, "1": 1, "2": 2,
    }


# --------------------------------------------------------------------------- key mapping
def _match_hf(hf_key: str) -> tuple[Rule, str | None]:
    for rx, rule in _HF_REGEXES:
        m = rx.match(hf_key)
        if m:
            return rule, (m.group(1) if m.groups() else None)
    raise CheckpointError(f"unexpected key {hf_key} (no CogVLM weight has this name)")


def _path_str(path) -> str:
    return path if isinstance(path, str) else "/".join(str(p) for p in path)


def hf_to_ours_key(hf_key: str) -> tuple[Path | None, str]:
    """``("model.layers.3.mlp.vision_mlp.up_proj.weight")`` -> ``(("layers_3", ..., "kernel"), "transpose")``.

    Buffers (``inv_freq``) map to ``(None, "buffer")``. An unknown name raises :class:`CheckpointError`.
    """
    rule, i = _match_hf(hf_key)
    if rule.ours is None:
        return None, rule.transform
    return tuple(rule.ours.replace("{i}", i or "").split("/")), rule.transform


def ours_to_hf_key(path) -> str:
    """Our path (tuple or ``"a/b/c"`` string) -> the published HF name."""
    s = _path_str(path)
    for rx, rule in _OURS_REGEXES:
        m = rx.match(s)
        if m:
            return rule.hf.replace("{i}", m.group(1) if m.groups() else "")
    raise CheckpointError(f"unexpected parameter {s} (no CogVLM weight has this name)")


def _expand(config: CogVLMConfig) -> Iterator[tuple[Rule, str]]:
    """(rule, HF key) for every key a complete checkpoint of ``config`` holds, in table order."""
    for rule in RULES:
        if rule.when and not _CONDITIONS[rule.when](config):
            continue
        if rule.layers is None:
            yield rule, rule.hf
        else:
            n = config.text.num_layers if rule.layers == "text" else config.vision.num_layers
            for i in range(n):
                yield rule, rule.hf.replace("{i}", str(i))


def expected_hf_keys(config: CogVLMConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a complete HF checkpoint of ``config`` (inv_freq buffers included) -> its HF shape."""
    dims = _dims(config)
    return {key: tuple(dims[s] for s in rule.shape) for rule, key in _expand(config)}


def optional_hf_keys(config: CogVLMConfig) -> set[str]:
    """Keys a checkpoint may lack (recomputable buffers)."""
    return {key for rule, key in _expand(config) if rule.optional}


def buffer_hf_keys(config: CogVLMConfig) -> list[str]:
    """The rotary ``inv_freq`` buffer keys, which are not parameters."""
    return [key for rule, key in _expand(config) if rule.transform == BUFFER]


def ours_shape(hf_shape: Sequence[int], transform: str) -> tuple[int, ...]:
    """The shape a tensor of ``hf_shape`` has in our tree after ``transform``."""
    s = tuple(hf_shape)
    if transform == TRANSPOSE:
        return s[::-1]
    if transform == CONV:
        return (s[2], s[3], s[1], s[0])
    return s


def expected_params_shapes(config: CogVLMConfig) -> dict[Path, tuple[int, ...]]:
    """Our parameter paths -> shapes, derived from the table alone (an independent check of the model)."""
    out = {}
    for key, shape in expected_hf_keys(config).items():
        path, transform = hf_to_ours_key(key)
        if path is not None:
            out[path] = ours_shape(shape, transform)
    return out


# --------------------------------------------------------------------------- array transforms
_ROW_BLOCK = 16


def transpose2d(a: np.ndarray) -> np.ndarray:
    """``a.T`` as a new C-contiguous array, copied 16 source rows at a time.

    On large matrices (the [128256, 4096] lm_head) this is several times faster than numpy's plain strided copy,
    which walks the destination with a stride of a whole row and thrashes the cache and TLB.
    """
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], _ROW_BLOCK):
        out[:, i:i + _ROW_BLOCK] = a[i:i + _ROW_BLOCK].T
    return out


# Our axis k is HF axis _AXES[transform][k] (``ours = hf.transpose(axes)``); other transforms keep the order.
_AXES = {TRANSPOSE: (1, 0), CONV: (2, 3, 1, 0)}


def layout_axes(transform: str, ndim: int) -> tuple[int, ...]:
    """The HF axis behind each of our axes after ``transform``."""
    return _AXES.get(transform, tuple(range(ndim)))


def rows_axis(transform: str, ndim: int) -> int:
    """Our axis that holds the HF tensor's first axis: a block along it is a contiguous run of the HF file."""
    return layout_axes(transform, ndim).index(0) if ndim else 0


def transform_of(path) -> str:
    """The transform between our parameter ``path`` and its HF tensor."""
    return _match_hf(ours_to_hf_key(path))[0].transform


def relayout(transform: str, array: np.ndarray) -> np.ndarray:
    """An HF-layout array (or a region of one) in our layout, C-contiguous."""
    if transform == TRANSPOSE:
        return transpose2d(array)
    if transform in _AXES:
        return np.ascontiguousarray(array.transpose(_AXES[transform]))
    return array


def hf_region(transform: str, index: Sequence[slice]) -> tuple[slice, ...]:
    """The HF-layout region behind the region ``index`` (one slice per our axis) of a re-laid-out tensor.

    ``relayout(t, hf[hf_region(t, index)]) == relayout(t, hf)[index]``: a slice of a transposed tensor is
    the transpose of the swapped slice of the source, so a loader can read only the source bytes it needs.
    """
    axes = layout_axes(transform, len(index))
    out: list[slice] = [slice(None)] * len(index)
    for ours_axis, hf_axis in enumerate(axes):
        out[hf_axis] = index[ours_axis]
    return tuple(out)


def to_ours(hf_key: str, array: np.ndarray) -> tuple[Path | None, np.ndarray]:
    """Map one HF tensor to (our path, array in our layout). Buffers give ``(None, array)``."""
    path, transform = hf_to_ours_key(hf_key)
    return path, relayout(transform, array)


def to_hf(path, array: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one of our parameters to (HF key, array in the PyTorch layout)."""
    key = ours_to_hf_key(path)
    transform = transform_of(path)
    if transform == TRANSPOSE:
        array = transpose2d(array)
    elif transform == CONV:
        array = np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    return key, array


# --------------------------------------------------------------------------- rotary buffer
def rotary_inv_freq(config: CogVLMConfig) -> np.ndarray:
    """``inv_freq`` exactly as the reference's float32 torch code computes it.

    torch: ``1.0 / (base ** (torch.arange(0, E, 2).float() / E))``. The exponent i/E is exact in float32
    (E a power of two in every published config); the power is taken in float64 and rounded once to
    float32 (the correctly rounded float32 power), then the float32 reciprocal. This matches both
    fixtures bit for bit; rounding the float64 reciprocal instead does not.
    """
    e = config.text.head_dim
    exponent = np.arange(0, e, 2, dtype=np.float32) / np.float32(e)
    power = (np.float64(config.text.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    return np.float32(1.0) / power
