"""The CLI end to end on the fixture checkpoints, in subprocesses, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import cases, fixture_dir, huge_png


def _run(*args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "cogvlm_jax.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def _model_args(family):
    d = fixture_dir(family)
    return ["--model", os.path.join(d, "checkpoint"), "--tokenizer", os.path.join(d, "tokenizer")]


def test_generate_streams_the_greedy_answer(f32_models):
    family = "cogvlm1"
    case = next(c for c in cases(family) if c["name"] == "chat_image")
    image = os.path.join(fixture_dir(family), "images", case["image"])
    r = _run("generate", *_model_args(family), "--image", image, "--prompt", case["query"],
             "--max-new-tokens", str(case["max_new_tokens"]))
    assert r.returncode == 0, r.stderr
    tok = f32_models[family].tokenizer
    ids = [int(i) for i in case["arrays"]["generated_ids"]]
    eos = f32_models[family].config.eos_token_ids
    if any(i in eos for i in ids):
        ids = ids[:min(ids.index(e) for e in eos if e in ids)]
    assert r.stdout == tok.decode(ids) + "\n"


def test_chat_repl_keeps_history(f32_models):
    family = "cogvlm2"
    image = os.path.join(fixture_dir(family), "images", "img1.png")
    # A mistyped /image and a question too long for the context are reported; the chat goes on as it was.
    r = _run("chat", *_model_args(family), "--image", image, "--max-new-tokens", "3",
             stdin="Describe the picture.\n/image no-such.png\n" + "word " * 8200 + "\nHow many squares are there?\n")
    assert r.returncode == 0, r.stderr
    assert "no-such.png not found" in r.stderr and "exceeds max_length" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout.count("cogvlm> ") == 2
    # The second turn is the model's answer with the first turn as history.
    model = f32_models[family]
    first = model.chat(image, "Describe the picture.", max_new_tokens=3)
    second = model.chat(image, "How many squares are there?", history=[("Describe the picture.", first)],
                        max_new_tokens=3)
    assert r.stdout.split("cogvlm> ")[2].split("\n")[0] == second, (r.stdout, second)


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    checks = [
        (["generate", *_model_args("cogvlm1"), "--image", str(tmp_path / "missing.png"), "--prompt", "hi"],
         "missing.png"),
        (["generate", *_model_args("cogvlm1"), "--image", str(not_image), "--prompt", "hi"], "notes.png"),
        (["generate", *_model_args("cogvlm1"), "--prompt", "hi", "--max-new-tokens", "5000"], "exceeds max_length"),
        (["generate", *_model_args("cogvlm1"), "--prompt", "hi", "--template", "poem"], "invalid choice: 'poem'"),
        (["generate", "--model", str(tmp_path), "--prompt", "hi"], "config.json"),
    ]
    for args, needle in checks:
        r = _run(*args)
        assert r.returncode != 0, args
        err_lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
        assert len(err_lines) == 1 and needle in err_lines[0], (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr


def test_an_image_of_too_many_pixels_is_refused_before_the_model_loads(tmp_path, capsys):
    from cogvlm_jax import cli

    big = tmp_path / "big.png"
    big.write_bytes(huge_png(7000, 6000))
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--image", str(big), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cogvlm-jax generate: error: ") and "\n" not in err, err
    assert f"image {big} is 7000x6000 = 42.0 megapixels, over the limit of 40 megapixels" in err


@pytest.mark.parametrize("value", ["0", "-2", "nan"])
def test_serve_refuses_a_peer_timeout_that_is_not_positive(value, capsys):
    from cogvlm_jax import cli

    assert cli.main(["serve", "--peer-timeout", value]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cogvlm-jax serve: error: --peer-timeout must be > 0 seconds, got {float(value)}", err


def test_convert_refuses_a_full_destination_and_overwrite_replaces_it(tmp_path, capsys):
    """The refusal names --overwrite, so the flag must exist and do what it says."""
    from cogvlm_jax.convert.checkpoint import is_our_checkpoint

    from cogvlm_jax import cli

    dst = tmp_path / "ours"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    src = os.path.join(fixture_dir("cogvlm1"), "checkpoint")
    assert cli.main(["convert", src, str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm-jax convert: error: ") and "--overwrite" in err
    assert cli.main(["convert", src, str(dst), "--overwrite"]) == 0
    assert is_our_checkpoint(str(dst)) and not (dst / "old.txt").exists()
