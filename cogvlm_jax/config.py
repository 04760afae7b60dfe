"""Frozen model configs built from a published Hugging Face ``config.json``.

``CogVLMConfig.from_hf_dict`` takes the file exactly as published (see ``presets/``). A field we do not
know is an error naming it. ``CogVLMVideoForCausalLM`` (CogVLM2-Video) is the CogVLM2 family with
``video=True``: its prompt holds T frames of 224 px, and its decoder has no vision expert. ``to_hf_dict``
writes a config.json the official remote code reads back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")

VISION_LANGUAGE = ("cogvlm1", "cogvlm2")


class ConfigError(ValueError):
    """A config.json we cannot build a model from; the message names the field."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    image_size: int
    patch_size: int
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    num_positions: int = 0  # cls + grid; checked against image/patch size
    downsample: bool = False  # CogVLM2's 2x2 stride-2 conv after the transformer

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_output_tokens(self) -> int:
        """Image tokens the adapter emits (without boi/eoi)."""
        g = self.grid // 2 if self.downsample else self.grid
        return g * g

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class TextConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    vision_qkv_bias: bool = False  # CogVLM2's vision-expert QKV has a bias, the language one has none
    vision_expert: bool = True  # False (CogVLM2-Video): every token, image or text, takes the language weights

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim


@dataclasses.dataclass(frozen=True)
class CogVLMConfig:
    family: str  # "cogvlm1" | "cogvlm2"
    vision: VisionConfig
    text: TextConfig
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    image_token_id: int  # placeholder id of the image slots in input_ids
    template_version: str = "chat"
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    name: str = ""
    video: bool = False  # CogVLM2-Video: a prompt holds T frames, each a span of num_image_tokens
    extra: tuple = ()  # pass-through HF fields we keep for export: ((key, json value), ...)

    @property
    def num_image_tokens(self) -> int:
        """Slots one image (one video frame) takes in the prompt: boi + adapter outputs + eoi."""
        return self.vision.num_output_tokens + 2

    @property
    def position_span(self) -> int | None:
        """``positions.position_ids``' ``image_tokens``: one image's span, so images side by side each get
        the single-image position rule; None for a video model, whose frames follow the reference's rule
        over each run of image tokens (the base template's frames side by side are one run)."""
        return None if self.video else self.num_image_tokens

    @property
    def architecture(self) -> str:
        return VIDEO_ARCHITECTURE if self.video else IMAGE_ARCHITECTURE

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "CogVLMConfig":
        """The config of a published ``config.json`` (a dict); every field it reads is checked for its type
        and range, and a bad one is a ``ConfigError`` naming it (``vision_config.num_heads must be a positive
        int, got 0``). Numbers are not coerced: ``"32"`` or ``32.0`` where a count belongs is an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"the config must be a JSON object, got {_kind(d)}")
        d = dict(d)
        unknown = sorted(set(d) - _TOP_FIELDS)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        archs = d.get("architectures") or ["CogVLMForCausalLM"]
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"architectures must be a list of names, got {archs!r}")
        if archs not in ([IMAGE_ARCHITECTURE], [VIDEO_ARCHITECTURE]):
            raise ConfigError(f"unsupported architectures {archs}; expected ['{IMAGE_ARCHITECTURE}'] "
                              f"(CogVLM, CogVLM2) or ['{VIDEO_ARCHITECTURE}'] (CogVLM2-Video)")
        video = archs == [VIDEO_ARCHITECTURE]
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                    "vocab_size", "vision_config"):
            if key not in d:
                raise ConfigError(f"config is missing required field {key!r}")
        for key, kind in _PASS_THROUGH_TYPES.items():
            if key in d and not isinstance(d[key], kind[0]):
                raise ConfigError(f"{key} must be {kind[1]}, got {d[key]!r}")
        if _str(d, "hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} not supported (only 'silu')")
        family = _str(d, "cogvlm_family", None)
        if family is None:
            # CogVLM2 ships the Llama-3 vocabulary and GQA; CogVLM1 the Llama-2 one.
            family = "cogvlm2" if (d.get("bos_token_id") == 128000 or "num_multi_query_heads" in d) else "cogvlm1"
        if family not in VISION_LANGUAGE:
            raise ConfigError(f"cogvlm_family {family!r} unknown; expected one of {VISION_LANGUAGE}")
        if video and family != "cogvlm2":
            raise ConfigError(f"{VIDEO_ARCHITECTURE} is a CogVLM2 model (Llama-3 vocabulary, GQA); "
                              f"cogvlm_family is {family!r}")
        v = d["vision_config"]
        if not isinstance(v, dict):
            raise ConfigError(f"vision_config must be an object of the vision tower's fields, got {_kind(v)}")
        unknown_v = sorted(set(v) - _VISION_FIELDS)
        if unknown_v:
            raise ConfigError(f"unknown vision_config field(s): {', '.join(unknown_v)}")
        if _str(v, "hidden_act", "gelu", "vision_config.") != "gelu":
            raise ConfigError(f"vision_config.hidden_act {v['hidden_act']!r} not supported (only 'gelu')")
        for key in ("hidden_size", "intermediate_size", "num_heads", "num_hidden_layers", "image_size", "patch_size"):
            if key not in v:
                raise ConfigError(f"vision_config is missing required field {key!r}")
        _number(v, "dropout_prob", 0.0, "vision_config.", low=0.0, high=1.0)

        def vi(key, default=None, low=1):
            return _int(v, key, default, "vision_config.", low)
        vision = VisionConfig(
            hidden_size=vi("hidden_size"), intermediate_size=vi("intermediate_size"),
            num_heads=vi("num_heads"), num_layers=vi("num_hidden_layers"),
            image_size=vi("image_size"), patch_size=vi("patch_size"), in_channels=vi("in_channels", 3),
            layer_norm_eps=_number(v, "layer_norm_eps", 1e-6, "vision_config.", positive=True),
            num_positions=vi("num_positions", 0, low=0), downsample=family == "cogvlm2")
        expected_pos = vision.num_patches + 1
        if vision.num_positions and vision.num_positions != expected_pos:
            raise ConfigError(
                f"vision_config.num_positions is {vision.num_positions} but image_size {vision.image_size} / "
                f"patch_size {vision.patch_size} needs {expected_pos} (grid + cls)")
        if vision.image_size % vision.patch_size or (vision.downsample and vision.grid % 2):
            raise ConfigError(f"vision_config.image_size {vision.image_size} does not tile into patches of "
                              f"{vision.patch_size}{' with a 2x2 downsample' if vision.downsample else ''}")
        if vision.hidden_size % vision.num_heads:
            raise ConfigError("vision_config.hidden_size is not divisible by num_heads")
        if video and vision.num_output_tokens != VIDEO_FRAME_PATCHES:
            # the official code lays out 64 + 2 slots per frame whatever the config says
            raise ConfigError(f"{VIDEO_ARCHITECTURE} takes {VIDEO_FRAME_PATCHES} patches per frame (8x8 after the 2x2 "
                              f"conv: vision_config.image_size / patch_size = 16), got "
                              f"{vision.image_size} / {vision.patch_size} -> {vision.num_output_tokens}")
        heads = _int(d, "num_attention_heads")
        kv_heads = _int(d, "num_multi_query_heads", 8) if family == "cogvlm2" else heads
        hidden = _int(d, "hidden_size")
        if hidden % heads or heads % kv_heads:
            raise ConfigError(f"hidden_size {hidden} / num_attention_heads {heads} / "
                              f"num_multi_query_heads {kv_heads} do not divide")
        if (hidden // heads) % 2:
            raise ConfigError(f"hidden_size {hidden} / num_attention_heads {heads} = head size {hidden // heads}, "
                              "which must be even (rotary embeddings rotate pairs)")
        vocab = _int(d, "vocab_size")
        text = TextConfig(
            hidden_size=hidden, intermediate_size=_int(d, "intermediate_size"),
            num_heads=heads, num_kv_heads=kv_heads, num_layers=_int(d, "num_hidden_layers"),
            vocab_size=vocab, rms_norm_eps=_number(d, "rms_norm_eps", 1e-5, positive=True),
            rope_theta=_number(d, "rope_theta", 500000.0 if family == "cogvlm2" else 10000.0, positive=True),
            max_position_embeddings=_int(d, "max_position_embeddings", 2048),
            vision_qkv_bias=family == "cogvlm2" and not video, vision_expert=not video)
        eos_ids = _token_ids(d.get("eos_token_id", 2), "eos_token_id", vocab)
        pad = 0 if d.get("pad_token_id") is None else _token_id(d["pad_token_id"], "pad_token_id", vocab)
        template = _str(d, "template_version", "chat")
        if template not in ("base", "chat", "vqa"):
            raise ConfigError(f"template_version {template!r} unknown; expected base, chat or vqa")
        torch_dtype = _str(d, "torch_dtype", "bfloat16")
        if torch_dtype not in TORCH_DTYPES:
            raise ConfigError(f"torch_dtype {torch_dtype!r} unknown; expected one of {', '.join(TORCH_DTYPES)}")
        tie = d.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {tie!r}")
        extra = tuple((k, json.dumps(d[k])) for k in sorted(_PASS_THROUGH) if k in d)
        return cls(
            family=family, vision=vision, text=text,
            bos_token_id=_token_id(d.get("bos_token_id", 1), "bos_token_id", vocab), eos_token_ids=eos_ids,
            pad_token_id=pad, image_token_id=_token_id(d.get("image_token_id", pad), "image_token_id", vocab),
            template_version=template, tie_word_embeddings=tie, torch_dtype=torch_dtype,
            name=_str(d, "_name_or_path", ""), video=video, extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "num_attention_heads": t.num_heads,
            "num_hidden_layers": t.num_layers,
            "rms_norm_eps": t.rms_norm_eps,
            "template_version": self.template_version,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "vocab_size": t.vocab_size,
            "vision_config": {
                "dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": v.hidden_size,
                "image_size": v.image_size, "in_channels": v.in_channels,
                "intermediate_size": v.intermediate_size, "layer_norm_eps": v.layer_norm_eps,
                "num_heads": v.num_heads, "num_hidden_layers": v.num_layers,
                "num_positions": v.num_patches + 1, "patch_size": v.patch_size,
            },
        }
        if self.family == "cogvlm2":
            d["num_multi_query_heads"] = t.num_kv_heads
        if self.name:
            d["_name_or_path"] = self.name
        default_theta = 500000.0 if self.family == "cogvlm2" else 10000.0
        if t.rope_theta != default_theta:
            d["rope_theta"] = t.rope_theta
        if self.image_token_id != self.pad_token_id:
            d["image_token_id"] = self.image_token_id
        for k, js in self.extra:
            d.setdefault(k, json.loads(js))
        return d

    @classmethod
    def from_json_file(cls, path: str) -> "CogVLMConfig":
        """A ``config.json``, with the ``generation_config.json`` beside it folded in (if there is one); an
        error names the file and the field."""
        d = _read_json(path)  # its errors name the file
        try:
            cfg = cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        gen = os.path.join(os.path.dirname(path), "generation_config.json")
        if os.path.exists(gen):
            cfg = cfg.with_generation_file(gen)
        return cfg

    def with_generation_file(self, path: str) -> "CogVLMConfig":
        """:meth:`with_generation_config` of a ``generation_config.json``; an error names the file."""
        g = _read_json(path)
        try:
            return self.with_generation_config(g)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def with_generation_config(self, g: dict[str, Any]) -> "CogVLMConfig":
        """Fold in a generation_config.json: its eos ids win over config.json's (null or absent: keep those)."""
        if not isinstance(g, dict):
            raise ConfigError(f"the generation config must be a JSON object, got {_kind(g)}")
        eos = g.get("eos_token_id")
        ids = self.eos_token_ids if eos is None else _token_ids(eos, "eos_token_id", self.text.vocab_size)
        return dataclasses.replace(self, eos_token_ids=ids)

    def replace(self, **kw) -> "CogVLMConfig":
        return dataclasses.replace(self, **kw)


IMAGE_ARCHITECTURE = "CogVLMForCausalLM"
VIDEO_ARCHITECTURE = "CogVLMVideoForCausalLM"
VIDEO_FRAME_PATCHES = 64  # adapter outputs per video frame (the official code's fixed 64 + 2 slots)

TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}") + (f" ({value!r})" if not isinstance(value, (dict, list)) else "")


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _int(d: dict, key: str, default: Any = None, where: str = "", low: int = 1) -> int:
    """``d[key]`` (or ``default``), which must be an int (not a bool, a float or a string) >= ``low``."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        want = "a positive int" if low == 1 else f"an int >= {low}"
        raise ConfigError(f"{where}{key} must be {want}, got {value!r}")
    return value


def _number(d: dict, key: str, default: float, where: str = "", positive: bool = False,
            low: float | None = None, high: float | None = None) -> float:
    """``d[key]`` (or ``default``): a finite JSON number (int or float), > 0 if ``positive``, in [low, high]."""
    value = d.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and \
        (not positive or value > 0) and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        want = "a positive number" if positive else "a number" + (
            f" in [{low:g}, {high:g}]" if low is not None and high is not None else "")
        raise ConfigError(f"{where}{key} must be {want}, got {value!r}")
    return float(value)


def _str(d: dict, key: str, default: Any, where: str = "") -> Any:
    value = d.get(key, default)
    if value is not default and not isinstance(value, str):
        raise ConfigError(f"{where}{key} must be a string, got {value!r}")
    return value


def _token_id(value: Any, key: str, vocab: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise ConfigError(f"{key} must be a token id, an int in [0, vocab_size {vocab}), got {value!r}")
    return value


def _token_ids(value: Any, key: str, vocab: int) -> tuple[int, ...]:
    """A token id or a non-empty list of them (``eos_token_id``)."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{key} must be a token id or a non-empty list of them, got []")
        return tuple(_token_id(v, key, vocab) for v in value)
    if value is None:
        raise ConfigError(f"{key} must be a token id or a non-empty list of them, got null")
    return (_token_id(value, key, vocab),)


_TOP_FIELDS = {
    "_name_or_path", "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "max_position_embeddings",
    "num_attention_heads", "num_hidden_layers", "num_multi_query_heads", "rms_norm_eps", "template_version",
    "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vision_config", "vocab_size",
    "model_type", "_from_model_config", "rope_theta", "image_token_id", "cogvlm_family",
}
_VISION_FIELDS = {
    "dropout_prob", "hidden_act", "hidden_size", "image_size", "in_channels", "intermediate_size",
    "layer_norm_eps", "num_heads", "num_hidden_layers", "num_positions", "patch_size",
}
# Fields that do not change the math but that an export should carry back unchanged.
_PASS_THROUGH = {"auto_map", "initializer_range", "transformers_version", "use_cache", "model_type"}
_PASS_THROUGH_TYPES = {
    "auto_map": (dict, "an object"), "initializer_range": ((int, float), "a number"),
    "transformers_version": (str, "a string"), "use_cache": (bool, "true or false"),
    "model_type": (str, "a string"), "_from_model_config": (bool, "true or false"),
}


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json") and ".generation_config" not in f)


def preset(name: str) -> CogVLMConfig:
    """A published config by checkpoint name, e.g. ``preset("cogvlm2-llama3-chat-19B")``."""
    path = os.path.join(PRESET_DIR, f"{name}.json")
    if not os.path.exists(path):
        raise ConfigError(f"no preset {name!r}; known: {', '.join(preset_names())}")
    cfg = CogVLMConfig.from_json_file(path)
    gen = os.path.join(PRESET_DIR, f"{name}.generation_config.json")
    if os.path.exists(gen):
        cfg = cfg.with_generation_file(gen)
    return cfg


def load_config(path: str) -> CogVLMConfig:
    """A config.json path, a checkpoint directory holding one, or a preset name."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"no config.json in {os.path.dirname(path)}")
    if os.path.exists(path):
        return CogVLMConfig.from_json_file(path)
    return preset(path)
