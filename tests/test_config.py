"""Configs: every published config.json parses, parameter counts, clear errors."""

import json
import os

import pytest

from cogvlm_jax.config import CogVLMConfig, ConfigError, load_config, preset, preset_names
from cogvlm_jax.models.cogvlm import count_params

SHARED_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "configs")


def test_every_preset_parses():
    names = preset_names()
    assert len(names) == 7
    for n in names:
        cfg = preset(n)
        assert cfg.family == ("cogvlm2" if "cogvlm2" in n else "cogvlm1")
        assert cfg.video == ("video" in n) and cfg.text.vision_expert == ("video" not in n)
    video = preset("cogvlm2-video-llama3-chat")
    assert video.num_image_tokens == 66 and not video.text.vision_qkv_bias
    assert CogVLMConfig.from_hf_dict(video.to_hf_dict()) == video
    bad = dict(video.to_hf_dict(), vision_config=dict(video.to_hf_dict()["vision_config"], image_size=448,
                                                      num_positions=1025))
    with pytest.raises(ConfigError, match="takes 64 patches per frame"):
        CogVLMConfig.from_hf_dict(bad)


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


# Every field read from config.json, wrong in type or range: an error naming the field (nothing coerced).
BAD_FIELDS = [
    ("num_attention_heads", 0, "num_attention_heads must be a positive int, got 0"),
    ("num_attention_heads", "32", "num_attention_heads must be a positive int, got '32'"),
    ("hidden_size", 4096.0, "hidden_size must be a positive int, got 4096.0"),
    ("intermediate_size", True, "intermediate_size must be a positive int, got True"),
    ("num_hidden_layers", -1, "num_hidden_layers must be a positive int, got -1"),
    ("vocab_size", None, "vocab_size must be a positive int, got None"),
    ("max_position_embeddings", 0, "max_position_embeddings must be a positive int, got 0"),
    ("eos_token_id", None, "eos_token_id must be a token id or a non-empty list of them, got null"),
    ("eos_token_id", [], "eos_token_id must be a token id or a non-empty list of them, got []"),
    ("eos_token_id", ["2"], "eos_token_id must be a token id, an int in [0, vocab_size"),
    ("eos_token_id", 10**9, "eos_token_id must be a token id, an int in [0, vocab_size"),
    ("bos_token_id", -1, "bos_token_id must be a token id"),
    ("pad_token_id", 1.5, "pad_token_id must be a token id"),
    ("image_token_id", "x", "image_token_id must be a token id"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a positive number, got 0"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps must be a positive number, got '1e-5'"),
    ("rope_theta", -1.0, "rope_theta must be a positive number, got -1.0"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, got 'false'"),
    ("template_version", 3, "template_version must be a string, got 3"),
    ("torch_dtype", "int8", "torch_dtype 'int8' unknown"),
    ("hidden_act", ["silu"], "hidden_act must be a string"),
    ("_name_or_path", 5, "_name_or_path must be a string, got 5"),
    ("architectures", "CogVLMForCausalLM", "architectures must be a list of names"),
    ("vision_config", [], "vision_config must be an object of the vision tower's fields, got a list"),
    ("vision_config", None, "vision_config must be an object of the vision tower's fields, got null"),
    ("use_cache", "yes", "use_cache must be true or false, got 'yes'"),
    ("auto_map", [], "auto_map must be an object, got []"),
    ("initializer_range", "0.02", "initializer_range must be a number"),
    ("vision_config.num_heads", 0, "vision_config.num_heads must be a positive int, got 0"),
    ("vision_config.image_size", "490", "vision_config.image_size must be a positive int, got '490'"),
    ("vision_config.patch_size", 14.0, "vision_config.patch_size must be a positive int, got 14.0"),
    ("vision_config.hidden_size", [1], "vision_config.hidden_size must be a positive int, got [1]"),
    ("vision_config.num_hidden_layers", 0, "vision_config.num_hidden_layers must be a positive int, got 0"),
    ("vision_config.intermediate_size", None, "vision_config.intermediate_size must be a positive int"),
    ("vision_config.in_channels", 0, "vision_config.in_channels must be a positive int, got 0"),
    ("vision_config.num_positions", -1, "vision_config.num_positions must be an int >= 0, got -1"),
    ("vision_config.layer_norm_eps", None, "vision_config.layer_norm_eps must be a positive number, got None"),
    ("vision_config.dropout_prob", 2, "vision_config.dropout_prob must be a number in [0, 1], got 2"),
    ("vision_config.hidden_act", 1, "vision_config.hidden_act must be a string, got 1"),
]


def _with(d, field, value):
    d = json.loads(json.dumps(d))
    *parents, key = field.split(".")
    target = d
    for p in parents:
        target = target[p]
    target[key] = value
    return d


@pytest.mark.parametrize("name", ["cogvlm-chat-hf", "cogvlm2-llama3-chat-19B"])
@pytest.mark.parametrize("field,value,message", BAD_FIELDS, ids=lambda x: str(x)[:30])
def test_a_field_of_the_wrong_type_or_value_is_named(name, field, value, message):
    with pytest.raises(ConfigError) as e:
        CogVLMConfig.from_hf_dict(_with(preset(name).to_hf_dict(), field, value))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_num_multi_query_heads_is_checked():
    d = preset("cogvlm2-llama3-chat-19B").to_hf_dict()
    for value, message in ((0, "got 0"), ("8", "got '8'"), (8.0, "got 8.0")):
        with pytest.raises(ConfigError, match=f"num_multi_query_heads must be a positive int, {message}"):
            CogVLMConfig.from_hf_dict(_with(d, "num_multi_query_heads", value))
    with pytest.raises(ConfigError, match="head size 3, which must be even"):
        CogVLMConfig.from_hf_dict(_with(_with(d, "hidden_size", 96), "num_attention_heads", 32))


def test_bad_files_are_named(tmp_path):
    path = tmp_path / "config.json"
    for text, message in (("[]", "the config must be a JSON object, got a list"), ("{", "is not valid JSON")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message) as e:
            load_config(str(tmp_path))
        assert str(path) in str(e.value)
    path.write_text(json.dumps(preset("cogvlm-chat-hf").to_hf_dict()))
    gen = tmp_path / "generation_config.json"
    for g, message in (([2], "the generation config must be a JSON object, got a list"),
                       ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
                       ({"eos_token_id": []}, "non-empty list"), ({"eos_token_id": [2, 32000]}, "got 32000")):
        gen.write_text(json.dumps(g))
        with pytest.raises(ConfigError, match=message) as e:
            load_config(str(tmp_path))
        assert str(gen) in str(e.value)
    gen.write_text(json.dumps({"eos_token_id": None, "max_new_tokens": 8}))  # null: config.json's eos ids
    assert load_config(str(tmp_path)).eos_token_ids == (2,)


def test_bad_config_on_the_cli_is_one_line(tmp_path, capsys):
    from cogvlm_jax import cli

    d = preset("cogvlm2-llama3-chat-19B").to_hf_dict()
    for field, value, message in (("vision_config.num_heads", 0, "vision_config.num_heads must be a positive int"),
                                  ("eos_token_id", None, "eos_token_id must be a token id"),
                                  ("vision_config", [1], "vision_config must be an object")):
        (tmp_path / "config.json").write_text(json.dumps(_with(d, field, value)))
        for argv in (["plan", "--config", str(tmp_path)], ["generate", "--model", str(tmp_path), "--prompt", "hi"]):
            assert cli.main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"cogvlm-jax {argv[0]}: error: {tmp_path / 'config.json'}: {message}"), err
            assert err.count("\n") == 1, err
