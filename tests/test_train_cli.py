"""``cogvlm-jax train`` end to end, in subprocesses: a run that learns, an exact resume, the export loads.

The data is memorisable: three circles of different colours and one text-only question. Fine-tuning the
tiny random CogVLM1 fixture on it must drive the loss down and make the exported model answer each.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import fixture_dir
from flax.traverse_util import flatten_dict
from PIL import Image, ImageDraw

from cogvlm_jax import cli

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 160, 30)}
QUESTION = "What color is the circle?"
TEXT_ONLY = {"query": "What do you say to a friend?", "answer": "hello friend"}
STEPS = 24


def _run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _train_args(data, out):
    d = fixture_dir("cogvlm1")
    return ["train", "--data", str(data), "--model", os.path.join(d, "checkpoint"), "--tokenizer",
            os.path.join(d, "tokenizer"), "--out", str(out), "--steps", str(STEPS), "--batch-size", "4",
            "--lr", "5e-3", "--warmup", "2", "--max-grad-norm", "0", "--save-every", str(STEPS // 2), "--quiet"]


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in f]


def _write_data(root):
    """The JSONL file (and its images) under ``root / "data"``; returns its path."""
    os.makedirs(root / "data" / "images")
    records = []
    for name, rgb in COLOURS.items():
        img = Image.new("RGB", (40, 40), "white")
        ImageDraw.Draw(img).ellipse((8, 8, 32, 32), fill=rgb)
        img.save(root / "data" / "images" / f"{name}.png")
        records.append({"image": f"images/{name}.png", "query": QUESTION, "answer": name})
    records.append(TEXT_ONLY)
    data = root / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One full run (checkpoints half-way and at the end), and a copy resumed half-way in a fresh process."""
    root = tmp_path_factory.mktemp("train_cli")
    data = _write_data(root)
    # Both processes compile the same step: a shared compilation cache saves the second one the work.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    first = _run(*_train_args(data, root / "a"), env=env)
    assert first.returncode == 0, first.stderr
    shutil.copytree(root / "a", root / "b")
    shutil.rmtree(root / "b" / "checkpoints" / f"step_{STEPS:08d}")
    shutil.rmtree(root / "b" / "model")
    resumed = _run("train", "--out", str(root / "b"), "--resume", "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    return root, data, first


def test_loss_goes_down_and_checkpoints_are_kept(run):
    root, _, first = run
    assert first.stdout.strip().splitlines()[-1] == str(root / "a" / "model")
    log = _log(root / "a")
    assert [e["step"] for e in log] == list(range(1, STEPS + 1))
    print(f"\nloss: first step {log[0]['loss']:.3f}, last step {log[-1]['loss']:.4f}")
    assert log[0]["loss"] > 5 and log[-1]["loss"] < min(0.1, log[STEPS // 2]["loss"] / 2)
    assert log[0]["lr"] == pytest.approx(2.5e-3) and log[1]["lr"] == pytest.approx(5e-3)  # warmup
    # the cosine from the peak at step 2 ends one step after the last (25): the last step still trains
    assert log[-1]["lr"] == pytest.approx(5e-3 * math.sin(math.pi / 2 / 23) ** 2, rel=1e-5) and log[-1]["lr"] > 0
    assert sorted(os.listdir(root / "a" / "checkpoints")) == [f"step_{STEPS // 2:08d}", f"step_{STEPS:08d}"]
    assert not [n for n in os.listdir(root / "a") if n.startswith(".")]


def test_resume_in_a_fresh_process_is_exact(run):
    root, _, _ = run
    assert _log(root / "b") == _log(root / "a")  # the second half logged again, with the same numbers
    a, b = root / "a" / "model", root / "b" / "model"
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_export_loads_and_answers(run):
    import cogvlm_jax

    root, _, _ = run
    model = cogvlm_jax.load(str(root / "a" / "model"), progress=False)
    assert model.tokenizer is not None  # copied into the export
    for name in COLOURS:
        image = str(root / "data" / "images" / f"{name}.png")
        assert model.chat(image, QUESTION, max_new_tokens=8) == name
    assert model.chat(None, TEXT_ONLY["query"], max_new_tokens=16) == TEXT_ONLY["answer"]
    r = _run("generate", "--model", str(root / "a" / "model"), "--image", str(root / "data" / "images" / "blue.png"),
             "--prompt", QUESTION, "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "blue\n"


def test_cli_errors_are_one_line(run, tmp_path, capsys):
    root, data, _ = run
    assert cli.main(_train_args(data, root / "a")) == 2
    assert "already holds a training run; pass --resume" in capsys.readouterr().err
    assert cli.main(["train", "--out", str(root / "b"), "--resume", "--lr", "0.5", "--quiet"]) == 2
    assert "train.learning_rate: 0.005 -> 0.5" in capsys.readouterr().err
    # The run recorded its data file; resuming on a changed one is refused (before anything is loaded).
    saved = json.loads((root / "b" / "run.json").read_text())
    assert saved["data"] == str(data) and saved["data_fingerprint"] == {
        "bytes": os.path.getsize(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    changed = tmp_path / "changed.jsonl"
    changed.write_bytes(data.read_bytes().replace(b'"answer": "red"', b'"answer": "rot"'))  # same size
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "run.json").write_text(json.dumps({**saved, "data": str(changed)}))
    assert cli.main(["train", "--out", str(tmp_path / "c"), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm-jax train: error: ") and err.count("\n") == 1, err
    assert f"the training data {changed} is not the file the run in {tmp_path / 'c'} started with" in err, err
    assert not os.path.exists(tmp_path / "c" / "log.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TEXT_ONLY) + "\n" + '{"query": "no answer"}\n')
    assert cli.main(_train_args(bad, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm-jax train: error: ") and f"{bad}:2: missing field 'answer'" in err
    assert not os.path.exists(tmp_path / "out")  # nothing written for a run that never started
    # cut short, a key missing, not an object, a fingerprint that is not one
    for broken in ("{not json", '{"data": "d.jsonl"}', "[]", json.dumps({**saved, "data_fingerprint": "abc"})):
        (tmp_path / "cut").mkdir(exist_ok=True)
        (tmp_path / "cut" / "run.json").write_text(broken)
        assert cli.main(["train", "--out", str(tmp_path / "cut"), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("cogvlm-jax train: error: ") and f"{tmp_path / 'cut' / 'run.json'}" in err, err


def test_a_one_step_run_changes_the_weights(tmp_path):
    """One step trains at the peak learning rate: the exported weights differ from the starting model's."""
    from cogvlm_jax.convert import convert_hf

    from cogvlm_jax.config import load_config

    data = _write_data(tmp_path)
    args = _train_args(data, tmp_path / "one")
    args[args.index("--steps") + 1] = "1"
    args[args.index("--warmup") + 1] = "0"
    assert cli.main(args) == 0
    assert [(e["step"], e["lr"]) for e in _log(tmp_path / "one")] == [(1, pytest.approx(5e-3))]
    before = convert_hf.read_hf_checkpoint(os.path.join(fixture_dir("cogvlm1"), "checkpoint"), progress=False)
    after = convert_hf.read_hf_checkpoint(str(tmp_path / "one" / "model"), progress=False)
    flat_before, flat_after = flatten_dict(before), flatten_dict(after)
    assert flat_before.keys() == flat_after.keys()
    unchanged = {k for k in flat_before if np.array_equal(flat_before[k], flat_after[k])}
    # Every weight moved but the last layer's vision expert after attention: what it does to image positions
    # reaches no answer token's logit, so its gradient is 0.
    last = f"layers_{load_config(os.path.join(fixture_dir('cogvlm1'), 'checkpoint')).text.num_layers - 1}"
    assert unchanged == {(last, "mlp", "vision_mlp", p, "kernel") for p in ("down_proj", "gate_proj", "up_proj")} | \
        {(last, "self_attn", "vision_expert_dense", "kernel")}, sorted(unchanged)
