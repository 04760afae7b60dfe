"""CogVLM2-Video against the official code (tests/fixtures-video): prompts, pixels, features, hidden states,
logits, greedy ids, a left-padded batch, loss and gradients; the demo's frame sampling on videos written
here with known timestamps; bad videos."""

from __future__ import annotations

import fractions
import json
import os

import jax
import numpy as np
import pytest
from conftest import FIXTURES_VIDEO

import cogvlm_jax
from cogvlm_jax.convert.convert_hf import SafetensorsFile
from cogvlm_jax.convert.mapping import expected_hf_keys, hf_to_ours_key, to_hf
from cogvlm_jax.inputs import video as video_lib
from cogvlm_jax.models.cogvlm import CogVLM
from cogvlm_jax.training.trainer import loss_fn

av = pytest.importorskip("av")

ROOT = os.path.join(FIXTURES_VIDEO, "cogvlm2-video")
TOL = 1e-4  # the image fixtures' float32 tolerance (logits, hidden states, vision features)


def _cases():
    with open(os.path.join(ROOT, "cases.json")) as f:
        recs = json.load(f)
    for r in recs:
        r["arrays"] = np.load(os.path.join(ROOT, "cases", r["name"] + ".npz"))
    return recs


@pytest.fixture(scope="module")
def model():
    return cogvlm_jax.load(os.path.join(ROOT, "checkpoint"), tokenizer=os.path.join(ROOT, "tokenizer"), progress=False)


def test_config_is_the_video_model_without_a_vision_expert(model):
    cfg = model.config
    assert cfg.video and not cfg.text.vision_expert and cfg.num_image_tokens == 66
    assert cfg.to_hf_dict()["architectures"] == ["CogVLMVideoForCausalLM"]
    flat = jax.tree_util.tree_flatten_with_path(model.params)[0]
    assert not [p for p, _ in flat if "vision_expert" in jax.tree_util.keystr(p) or "vision_mlp" in
                jax.tree_util.keystr(p)]


def test_converter_names_are_the_checkpoint_s_bit_for_bit(model):
    """Every tensor of the published layout maps to one of ours and back to the same bytes, and the table's
    keys for this config are exactly the checkpoint's."""
    ckpt = os.path.join(ROOT, "checkpoint")
    seen = {}
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            f = SafetensorsFile(os.path.join(ckpt, name))
            for key in f.tensors:
                seen[key] = f.read(key)
    assert set(seen) == set(expected_hf_keys(model.config))
    for key, hf in seen.items():
        path, _ = hf_to_ours_key(key)
        if path is None:  # the rotary buffer
            continue
        leaf = model.params
        for k in path:
            leaf = leaf[k]
        back_key, back = to_hf(path, np.asarray(leaf).astype(hf.dtype))
        assert back_key == key and back.shape == hf.shape and back.tobytes() == hf.tobytes(), key


@pytest.fixture(scope="module")
def apply_case(model):
    """One jitted program per prompt shape: (logits, hidden states, vision features or None)."""
    def run(p, ids, tt, am, pv):
        logits, _, hidden = model.module.apply({"params": p}, ids, tt, am, pv, return_hidden=True)
        vf = None if pv is None else model.module.apply({"params": p}, pv, method=CogVLM.encode_images)
        return logits, hidden, vf
    return jax.jit(run)


def test_every_case_matches_the_reference(model, apply_case):
    worst = {"vision": 0.0, "hidden": 0.0, "logits": 0.0, "last_logits": 0.0}
    for case in _cases():
        a = case["arrays"]
        frames = a["frames"] if "frames" in a.files else None
        x = model.build_inputs(case["query"], case["history"], template=case["template"], video=frames)
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            assert np.array_equal(x[key], a[key]), (case["name"], key)
        if frames is None:
            assert x["pixel_values"] is None
        else:
            assert x["pixel_values"].dtype == np.float32 and np.array_equal(x["pixel_values"], a["pixel_values"])
        pv = None if frames is None else a["pixel_values"][None]
        logits, hidden, vf = apply_case(model.params, a["input_ids"][None], a["token_type_ids"][None],
                                        a["attention_mask"][None], pv)
        if vf is not None:
            worst["vision"] = max(worst["vision"], float(np.abs(np.asarray(vf[0]).reshape(a["vision_features"].shape)
                                                                 - a["vision_features"]).max()))
        assert len(hidden) == a["hidden_states"].shape[0]
        for i, h in enumerate(hidden):
            worst["hidden"] = max(worst["hidden"], float(np.abs(np.asarray(h[0]) - a["hidden_states"][i]).max()))
        logits = np.asarray(logits[0])
        worst["logits"] = max(worst["logits"], float(np.abs(logits[:, a["logits_columns"]] - a["logits"]).max()))
        worst["last_logits"] = max(worst["last_logits"], float(np.abs(logits[-1] - a["last_logits"]).max()))
    print(f"\ncogvlm2-video float32 max abs errors: {worst}")
    assert max(worst.values()) <= TOL, worst


def test_left_padded_batch_of_the_cases(model):
    """Rows of 3 frames (chat), 2 frames whose spans touch (base) and none, padded into one batch: each row
    gets its own logits and its own greedy answer (the shorter video's missing frame is zeros its prompt
    never reads)."""
    from cogvlm_jax.inputs.preprocess import pad_batch

    recs = _cases()
    rows = [{k: r["arrays"][k] for k in ("input_ids", "token_type_ids", "attention_mask")} |
            {"pixel_values": r["arrays"]["pixel_values"] if "pixel_values" in r["arrays"].files else None}
            for r in recs]
    b = pad_batch(rows, model.config.pad_token_id)
    assert b["pixel_values"].shape == (3, 3, 3, 224, 224)
    batch = (b["input_ids"], b["token_type_ids"], b["attention_mask"], b["pixel_values"])
    out = model.forward(*batch)
    n = b["input_ids"].shape[1]
    worst = 0.0
    for i, r in enumerate(recs):
        a = r["arrays"]
        m = len(a["input_ids"])
        worst = max(worst, float(np.abs(out[i, n - m:][:, a["logits_columns"]] - a["logits"]).max()))
    print(f"\ncogvlm2-video batched max abs logit error: {worst:.2e}")
    assert worst <= TOL
    ids = model.generate(*batch, max_new_tokens=max(r["max_new_tokens"] for r in recs))
    for i, r in enumerate(recs):
        assert ids[i, :r["max_new_tokens"]].tolist() == r["generated_ids"], r["name"]


def test_loss_and_gradients_match_the_reference(model):
    (rec,) = [r for r in _cases() if "loss" in r["arrays"].files]
    a = rec["arrays"]
    batch = {"input_ids": a["train_input_ids"][None], "token_type_ids": a["train_token_type_ids"][None],
             "attention_mask": np.ones_like(a["train_input_ids"])[None], "labels": a["train_labels"][None],
             "pixel_values": a["pixel_values"][None]}
    x = model.build_inputs(rec["query"], rec["history"], template=rec["template"], video=a["frames"])
    assert len(x["input_ids"]) < len(a["train_input_ids"])
    (loss, _), grads = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(model.module, p, b), has_aux=True))(
        model.params, batch)
    assert abs(float(loss) - float(a["loss"])) <= 1e-5 * abs(float(a["loss"]))
    names = [k[len("grad/"):] for k in a.files if k.startswith("grad/")]
    assert len(names) >= 4
    for name in names:
        path, _ = hf_to_ours_key(name)
        leaf = grads
        for k in path:
            leaf = leaf[k]
        key, ours = to_hf(path, np.asarray(leaf))
        ref = a["grad/" + name]
        assert key == name and ours.shape == ref.shape and np.abs(ref).max() > 0
        assert float(np.abs(ours - ref).max() / np.abs(ref).max()) <= 1e-4, name


# ------------------------------------------------------------------------------ files and sampling
def _write(path, pts, rate=10, size=16, step=7):
    """A tiny video whose frame i has presentation time ``pts[i] / rate`` s and the grey level ``step * i``."""
    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=rate)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        s.time_base = fractions.Fraction(1, rate)
        for i, p in enumerate(pts):
            f = av.VideoFrame.from_ndarray(np.full((size, size, 3), step * i, np.uint8), format="rgb24")
            f = f.reformat(format="yuv420p")
            f.pts = p
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def _which(frames, step=7):
    """The index of each decoded frame, read back from its grey level."""
    return [int(round(float(v) / step)) for v in frames[0, :, 8, 8]]


def test_chat_takes_the_frame_nearest_each_whole_second(tmp_path):
    # 3.5 s at 10 fps: seconds 0..3 -> frames 0, 10, 20, 30
    path = _write(str(tmp_path / "even.mp4"), list(range(35)))
    frames = video_lib.read_video(path, "chat")
    assert frames.dtype == np.uint8 and frames.shape == (3, 4, 16, 16)
    assert _which(frames) == [0, 10, 20, 30]
    # irregular times 0, .3, .9, 1.4, 1.6, 2.5 s: round(2.5) = 2, so seconds 0..2 -> 0 s, .9 s, 1.6 s
    uneven = _write(str(tmp_path / "uneven.mp4"), [0, 3, 9, 14, 16, 25])
    assert _which(video_lib.read_video(uneven, "chat")) == [0, 2, 4]
    # at most 24: a 40 s video at 1 fps gives its first 24 seconds
    long = _write(str(tmp_path / "long.mp4"), list(range(30)), rate=1)
    assert _which(video_lib.read_video(long, "chat")) == list(range(24))


def test_base_takes_24_frames_evenly_over_the_first_minute(tmp_path):
    path = _write(str(tmp_path / "even.mp4"), list(range(35)))
    frames = video_lib.read_video(path, "base")
    assert frames.shape[1] == 24
    assert _which(frames) == np.linspace(0, 34, 24, dtype=int).tolist()
    # 70 s at 2 fps: only the first 60 s (120 frames) are sampled
    assert video_lib.sample_indices([i / 2 for i in range(140)], 2.0, "base") == \
        np.linspace(0, 119, 24, dtype=int).tolist()
    # a file of 70 s at 1 fps (grey levels 3 apart, which the codec keeps to within one step): frames 0..59
    long = _write(str(tmp_path / "long.mp4"), list(range(70)), rate=1, step=3)
    got = _which(video_lib.read_video(long, "base"), step=3)
    want = np.linspace(0, 59, 24, dtype=int)
    assert len(got) == 24 and np.abs(np.array(got) - want).max() <= 1, got


def test_a_video_file_goes_through_build_inputs(model, tmp_path):
    path = _write(str(tmp_path / "clip.mp4"), list(range(25)))
    x = model.build_inputs("What happens?", video=path, template="chat")
    assert x["pixel_values"].shape == (3, 3, 224, 224)  # seconds 0, 1, 2
    assert int(x["token_type_ids"].sum()) == 3 * 66


def test_bad_videos_are_named(model, tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00 not a video " * 64)
    with pytest.raises(video_lib.VideoError, match=f"cannot decode video {junk}"):
        model.build_inputs("?", video=str(junk))
    empty = str(tmp_path / "empty.mkv")
    with av.open(empty, "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width = s.height = 16
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    with pytest.raises(video_lib.VideoError, match="has no frames"):
        model.build_inputs("?", video=empty)
    with pytest.raises(video_lib.VideoError, match="no frames"):
        model.build_inputs("?", video=np.zeros((3, 0, 8, 8), np.uint8))
    with pytest.raises(video_lib.VideoError, match="uint8 array"):
        model.build_inputs("?", video=np.zeros((3, 2, 8, 8), np.float32))
    # 2048 tokens hold 30 frames of 66 + a 1- or 2-token index with this prompt; 31 do not
    too_many = np.zeros((3, 31, 8, 8), np.uint8)
    with pytest.raises(video_lib.VideoError, match=r"a video of 31 frames .* over the model's context of 2048 tokens: "
                                                   r"30 frames fit"):
        model.build_inputs("What happens?", video=too_many, template="chat")
    big = _write(str(tmp_path / "big.mp4"), [0], size=64)
    with pytest.raises(video_lib.VideoError, match="64x64 = 0.0 megapixels, over the limit"):
        video_lib.read_video(big, "chat", max_pixels=64 * 63)
    with pytest.raises(ValueError, match="video model: pass the frames as video="):
        model.build_inputs("?", image=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(cogvlm_jax.InputError, match="with T >= 3"):
        a = _cases()[0]["arrays"]
        model.forward(a["input_ids"][None], a["token_type_ids"][None], a["attention_mask"][None],
                      a["pixel_values"][None, :2])


def test_generate_cli_and_the_server_answer_about_a_video_file(model, tmp_path):
    """``cogvlm-jax generate --video`` and a chat request with an OpenAI-style ``video_url`` part (a data URL,
    and a file:// URL under --image-root) give ``model.chat``'s answer; an undecodable video is a 400."""
    import base64
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from cogvlm_jax.serving.engine import Engine
    from cogvlm_jax.serving.server import BackgroundServer, ServerConfig

    path = _write(str(tmp_path / "clip.mp4"), list(range(25)))
    # the chat template (3 frames here; base always samples 24): a model of the same weights whose config says it
    chat = cogvlm_jax.api.Model(model.config.replace(template_version="chat"), model.params, model.tokenizer)
    want = chat.chat(video=path, query="What happens?", max_new_tokens=3)
    r = subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", "generate", "--model", os.path.join(ROOT, "checkpoint"),
                        "--tokenizer", os.path.join(ROOT, "tokenizer"), "--video", path, "--template", "chat",
                        "--prompt", "What happens?", "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"

    def ask(url):
        body = {"model": "video", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}]}
        req = urllib.request.Request(srv.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    eng = Engine(chat, slots=1, max_length=512, max_queue=4).start()
    srv = BackgroundServer(eng, ServerConfig("video", image_root=str(tmp_path)), manage_engine=True).start()
    try:
        with open(path, "rb") as f:
            status, out = ask("data:video/mp4;base64," + base64.b64encode(f.read()).decode())
        assert status == 200, out
        assert out["choices"][0]["message"]["content"] == want
        status, out = ask("file://" + path)
        assert status == 200 and out["choices"][0]["message"]["content"] == want, out
        (tmp_path / "junk.mp4").write_bytes(b"\x00 not a video " * 64)
        status, out = ask("file://" + str(tmp_path / "junk.mp4"))
        assert status == 400 and out["error"]["code"] == "invalid_video" and "cannot decode" in out["error"]["message"]
    finally:
        srv.stop()


def test_sharded_and_bfloat16_models_read_the_video_checkpoint(model):
    """Loaded straight onto a data x fsdp x tensor mesh, the video model gives the reference logits of the
    base case (two frames whose spans touch); in bfloat16 every weight holds a bfloat16 value (the
    checkpoint's own); a vision-expert fine-tune of a decoder without one is refused by name."""
    from cogvlm_jax import make_mesh
    from cogvlm_jax.training.trainer import TrainConfig, Trainer

    a = _cases()[1]["arrays"]
    assert a["pixel_values"].shape[0] == 2
    batch = (a["input_ids"][None], a["token_type_ids"][None], a["attention_mask"][None], a["pixel_values"][None])
    kw = dict(tokenizer=os.path.join(ROOT, "tokenizer"), progress=False)
    sharded = cogvlm_jax.load(os.path.join(ROOT, "checkpoint"), mesh=make_mesh(1, 2, 2, devices=jax.devices()[:4]),
                              **kw)
    err = float(np.abs(sharded.forward(*batch)[0][:, a["logits_columns"]] - a["logits"]).max())
    print(f"\ncogvlm2-video on a 1x2x2 mesh: max abs logit error {err:.2e}")
    assert err <= TOL
    bf16 = cogvlm_jax.load(os.path.join(ROOT, "checkpoint"), dtype="bfloat16", **kw)
    for p in jax.tree_util.tree_leaves(bf16.params):
        assert bool(np.all(np.asarray(p.astype(jax.numpy.bfloat16).astype(p.dtype)) == np.asarray(p)))
    with pytest.raises(ValueError, match="needs a decoder with a vision expert"):
        Trainer(model.config, TrainConfig(trainable="vision-expert"))
