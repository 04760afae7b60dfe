"""Configs: every published config.json parses, parameter counts, clear errors."""

import json
import os

import pytest

from cogvlm_jax.config import CogVLMConfig, ConfigError, load_config, preset, preset_names
from cogvlm_jax.models.cogvlm import count_params

SHARED_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs")


def test_every_preset_parses_except_video():
    ok = [n for n in preset_names() if "video" not in n]
    assert len(ok) == 6
    for n in ok:
        cfg = preset(n)
        assert cfg.family == ("cogvlm2" if "cogvlm2" in n else "cogvlm1")
    with pytest.raises(ConfigError, match=r"video model\) is not supported yet"):
        preset("cogvlm2-video-llama3-chat")


@pytest.mark.skipif(not os.path.isdir(SHARED_CONFIGS), reason="../shared not beside the checkout")
def test_presets_are_the_published_files():
    for n in os.listdir(SHARED_CONFIGS):
        with open(os.path.join(SHARED_CONFIGS, n, "config.json")) as f:
            published = json.load(f)
        with open(os.path.join(os.path.dirname(__file__), "..", "cogvlm_jax", "presets", n + ".json")) as f:
            assert json.load(f) == published


def test_cogvlm2_defaults():
    c = preset("cogvlm2-llama3-chat-19B")
    assert c.text.num_kv_heads == 8  # num_multi_query_heads omitted in the published file
    assert c.text.rope_theta == 500000.0 and c.text.vision_qkv_bias
    assert c.num_image_tokens == 2306 and c.image_token_id == 128002
    assert c.eos_token_ids == (128001, 128009)
    c1 = preset("cogvlm-chat-hf")
    assert c1.num_image_tokens == 1227 and c1.image_token_id == 0 and c1.text.num_kv_heads == 32
    assert c1.text.rope_theta == 10000.0 and not c1.vision.downsample


def test_parameter_counts_from_abstract_shapes():
    # eval_shape only: nothing of these 17.6B / 19.5B models is allocated.
    assert count_params(preset("cogvlm-chat-hf")) == 17_639_685_376
    assert count_params(preset("cogvlm2-llama3-chat-19B")) == 19_503_105_280


def test_published_index_total_size_matches_param_count():
    # The real CogVLM2 index says 39,006,214,656 bytes of bf16 = params + 32 inv_freq buffers of 64.
    assert 2 * (count_params(preset("cogvlm2-llama3-chat-19B")) + 32 * 64) == 39_006_214_656


def test_unknown_field_is_named():
    d = preset("cogvlm-chat-hf").to_hf_dict()
    d["rope_scaling"] = {"type": "linear"}
    with pytest.raises(ConfigError, match="rope_scaling"):
        CogVLMConfig.from_hf_dict(d)
    d = preset("cogvlm-chat-hf").to_hf_dict()
    d["vision_config"]["use_flash"] = True
    with pytest.raises(ConfigError, match="use_flash"):
        CogVLMConfig.from_hf_dict(d)


def test_round_trip_through_hf_dict():
    for n in ("cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"):
        c = preset(n)
        assert CogVLMConfig.from_hf_dict(c.to_hf_dict()).replace(eos_token_ids=c.eos_token_ids) == c


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(str(tmp_path))
