"""Frozen model configs built from a published Hugging Face ``config.json``.

``CogVLMConfig.from_hf_dict`` takes the file exactly as published (see ``presets/``). A field we do not
know is an error naming it; the video model is an error saying it is not supported yet. ``to_hf_dict``
writes a config.json the official remote code reads back.
"""

from __future__ import annotations

import dataclasses
import json
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
    extra: tuple = ()  # pass-through HF fields we keep for export: ((key, json value), ...)

    @property
    def num_image_tokens(self) -> int:
        """Slots one image takes in the prompt: boi + adapter outputs + eoi."""
        return self.vision.num_output_tokens + 2

    @property
    def context_length(self) -> int:
        return self.text.max_position_embeddings

    # ------------------------------------------------------------------ HF json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "CogVLMConfig":
        d = dict(d)
        unknown = sorted(set(d) - _TOP_FIELDS)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        archs = d.get("architectures") or ["CogVLMForCausalLM"]
        if any("Video" in a for a in archs):
            raise ConfigError(
                f"architecture {archs[0]} (the CogVLM2 video model) is not supported yet; "
                "supported: CogVLMForCausalLM (CogVLM and CogVLM2 image chat)")
        if archs != ["CogVLMForCausalLM"]:
            raise ConfigError(f"unsupported architectures {archs}; expected ['CogVLMForCausalLM']")
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                    "vocab_size", "vision_config"):
            if key not in d:
                raise ConfigError(f"config is missing required field {key!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {d['hidden_act']!r} not supported (only 'silu')")
        family = d.get("cogvlm_family")
        if family is None:
            # CogVLM2 ships the Llama-3 vocabulary and GQA; CogVLM1 the Llama-2 one.
            family = "cogvlm2" if (d.get("bos_token_id") == 128000 or "num_multi_query_heads" in d) else "cogvlm1"
        if family not in VISION_LANGUAGE:
            raise ConfigError(f"cogvlm_family {family!r} unknown; expected one of {VISION_LANGUAGE}")
        v = dict(d["vision_config"])
        unknown_v = sorted(set(v) - _VISION_FIELDS)
        if unknown_v:
            raise ConfigError(f"unknown vision_config field(s): {', '.join(unknown_v)}")
        if v.get("hidden_act", "gelu") != "gelu":
            raise ConfigError(f"vision_config.hidden_act {v['hidden_act']!r} not supported (only 'gelu')")
        for key in ("hidden_size", "intermediate_size", "num_heads", "num_hidden_layers", "image_size", "patch_size"):
            if key not in v:
                raise ConfigError(f"vision_config is missing required field {key!r}")
        vision = VisionConfig(
            hidden_size=int(v["hidden_size"]), intermediate_size=int(v["intermediate_size"]),
            num_heads=int(v["num_heads"]), num_layers=int(v["num_hidden_layers"]),
            image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
            in_channels=int(v.get("in_channels", 3)), layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
            num_positions=int(v.get("num_positions", 0)), downsample=family == "cogvlm2")
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
        heads = int(d["num_attention_heads"])
        kv_heads = int(d.get("num_multi_query_heads", 8)) if family == "cogvlm2" else heads
        if int(d["hidden_size"]) % heads or heads % kv_heads:
            raise ConfigError(f"hidden_size {d['hidden_size']} / num_attention_heads {heads} / "
                              f"num_multi_query_heads {kv_heads} do not divide")
        text = TextConfig(
            hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
            num_heads=heads, num_kv_heads=kv_heads, num_layers=int(d["num_hidden_layers"]),
            vocab_size=int(d["vocab_size"]), rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(d.get("rope_theta", 500000.0 if family == "cogvlm2" else 10000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            vision_qkv_bias=family == "cogvlm2")
        eos = d.get("eos_token_id", 2)
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        pad = int(d.get("pad_token_id", 0) if d.get("pad_token_id") is not None else 0)
        template = d.get("template_version", "chat")
        if template not in ("base", "chat", "vqa"):
            raise ConfigError(f"template_version {template!r} unknown; expected base, chat or vqa")
        extra = tuple((k, json.dumps(d[k])) for k in sorted(_PASS_THROUGH) if k in d)
        return cls(
            family=family, vision=vision, text=text,
            bos_token_id=int(d.get("bos_token_id", 1)), eos_token_ids=eos_ids, pad_token_id=pad,
            image_token_id=int(d.get("image_token_id", pad)), template_version=template,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            torch_dtype=str(d.get("torch_dtype", "bfloat16")), name=str(d.get("_name_or_path", "")),
            extra=extra)

    def to_hf_dict(self) -> dict[str, Any]:
        t, v = self.text, self.vision
        d: dict[str, Any] = {
            "architectures": ["CogVLMForCausalLM"],
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
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        try:
            cfg = cls.from_hf_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        gen = os.path.join(os.path.dirname(path), "generation_config.json")
        if os.path.exists(gen):
            cfg = cfg.with_generation_config(json.load(open(gen)))
        return cfg

    def with_generation_config(self, g: dict[str, Any]) -> "CogVLMConfig":
        """Fold in a generation_config.json: its eos ids win over config.json's."""
        eos = g.get("eos_token_id")
        ids = self.eos_token_ids if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        return dataclasses.replace(self, eos_token_ids=ids)

    def replace(self, **kw) -> "CogVLMConfig":
        return dataclasses.replace(self, **kw)


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
        cfg = cfg.with_generation_config(json.load(open(gen)))
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
