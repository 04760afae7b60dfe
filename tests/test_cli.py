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


def test_generate_streams_the_greedy_answer(f32_models, tmp_path):
    """...and with --boxes-out writes the input picture, at its size, with the answer's boxes drawn."""
    from PIL import Image

    from cogvlm_jax.grounding import draw_boxes, parse_boxes

    family = "cogvlm1"
    case = next(c for c in cases(family) if c["name"] == "chat_image")
    image = os.path.join(fixture_dir(family), "images", case["image"])
    boxes_out = tmp_path / "boxes.jpg"
    r = _run("generate", *_model_args(family), "--image", image, "--prompt", case["query"],
             "--max-new-tokens", str(case["max_new_tokens"]), "--boxes-out", str(boxes_out))
    assert r.returncode == 0, r.stderr
    tok = f32_models[family].tokenizer
    ids = [int(i) for i in case["arrays"]["generated_ids"]]
    eos = f32_models[family].config.eos_token_ids
    if any(i in eos for i in ids):
        ids = ids[:min(ids.index(e) for e in eos if e in ids)]
    assert r.stdout == tok.decode(ids) + "\n"
    src = Image.open(image).convert("RGB")
    drawn = Image.open(boxes_out)
    assert drawn.format == "JPEG" and drawn.size == src.size
    boxes = parse_boxes(r.stdout, src.size)
    assert f"{len(boxes)} box" in r.stderr
    want = draw_boxes(src, boxes)
    want.save(tmp_path / "want.jpg", format="JPEG")
    assert (Image.open(tmp_path / "want.jpg").tobytes() == drawn.tobytes())


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


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    """The first case in a real process (its exit status, and nothing else on its stderr names an error, JAX's
    own start-up lines included); the others through the same ``cli.main`` in this process."""
    from cogvlm_jax import cli

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
    for k, (args, needle) in enumerate(checks):
        if k == 0:
            r = _run(*args)
            rc, err = r.returncode, r.stderr
        else:
            try:
                rc = cli.main(args)
            except SystemExit as e:  # argparse's own exit
                rc = e.code
            err = capsys.readouterr().err
        assert rc != 0, args
        err_lines = [ln for ln in err.splitlines() if "error" in ln]
        assert len(err_lines) == 1 and needle in err_lines[0], (args, err[-2000:])
        assert "Traceback" not in err


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


# A bad option of every kind, on every verb that has it: one line, exit status 2, before anything loads.
BAD_OPTIONS = [
    (["serve", "--port", "99999"], "argument --port: must be an integer in [0, 65535], got 99999"),
    (["serve", "--port", "-1"], "argument --port: must be an integer in [0, 65535], got -1"),
    (["serve", "--port", "80.5"], "argument --port: expected an integer, got '80.5'"),
    (["serve", "--slots", "0"], "argument --slots: must be an integer >= 1, got 0"),
    (["serve", "--max-queue", "-1"], "argument --max-queue: must be an integer >= 0, got -1"),
    (["serve", "--max-image-bytes", "0"], "argument --max-image-bytes: must be an integer >= 1"),
    (["serve", "--drain-seconds", "inf"], "argument --drain-seconds: must be a finite number >= 0, got 'inf'"),
    (["serve", "--coordinator", "host:99999", "--num-processes", "2", "--process-id", "0"],
     "coordinator must be HOST:PORT with a port in [1, 65535], got 'host:99999'"),
    (["serve", "--mesh", "1,0,1"], "argument --mesh: must be DATA,FSDP,TENSOR, each a device count >= 1"),
    (["convert", "a", "b", "--mesh", "0,1,1"], "argument --mesh: must be DATA,FSDP,TENSOR, each a device count >= 1"),
    (["convert", "a", "b", "--mesh", "1,1"], "argument --mesh: must be DATA,FSDP,TENSOR (three integers)"),
    (["convert", "a", "b", "--max-shard-size", "5XB"], "argument --max-shard-size: expected a size such as 5GB"),
    (["convert", "a", "b", "--max-shard-size", "0"], "argument --max-shard-size: must be at least 1 byte"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "argument --temperature: must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: must be a finite number > 0 and <= 1"),
    (["generate", "--prompt", "hi", "--top-k", "x"], "argument --top-k: expected an integer, got 'x'"),
    (["generate", "--prompt", "hi", "--mesh=-1,1,1"], "argument --mesh: must be DATA,FSDP,TENSOR, each a device"),
    (["chat", "--seed", "-3"], "argument --seed: must be an integer >= 0, got -3"),
    (["plan", "--config", "cogvlm-chat-hf", "--mesh", "1,1,0"], "argument --mesh: must be DATA,FSDP,TENSOR, each"),
    (["plan", "--config", "cogvlm-chat-hf", "--batch", "0"], "argument --batch: must be an integer >= 1, got 0"),
    (["compile", "--config", "cogvlm-chat-hf", "--cache-length", "0"], "argument --cache-length: must be an integer"),
    (["compile", "--config", "cogvlm-chat-hf", "--mesh", "a,b,c"], "argument --mesh: must be DATA,FSDP,TENSOR"),
    (["train", "--out", "o", "--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["train", "--out", "o", "--lr", "nan"], "argument --lr: must be a finite number > 0, got 'nan'"),
    (["train", "--out", "o", "--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["train", "--out", "o", "--epochs", "-1"], "argument --epochs: must be a finite number > 0"),
    (["train", "--out", "o", "--batch-size", "2.5"], "argument --batch-size: expected an integer, got '2.5'"),
    (["train", "--out", "o", "--end-lr-ratio", "2"], "argument --end-lr-ratio: must be a finite number >= 0 and <= 1"),
    (["train", "--out", "o", "--save-every", "0"], "argument --save-every: must be an integer >= 1"),
    (["train", "--out", "o", "--mesh", "1,1,1,1"], "argument --mesh: must be DATA,FSDP,TENSOR (three integers)"),
    (["train", "--out", "o", "--init-timeout", "0", "--coordinator", "h:1", "--num-processes", "1", "--process-id",
      "0"], "the time to join the cluster (--init-timeout) must be a number of seconds > 0, got 0.0"),
    (["serve", "--num-processes", "two"], "argument --num-processes: invalid int value: 'two'"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_a_bad_option_is_one_line_and_exit_2(argv, message, capsys):
    from cogvlm_jax import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"cogvlm-jax {argv[0]}: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_train_defaults_to_the_shipped_model_like_generate_and_serve(tmp_path, monkeypatch):
    from cogvlm_jax.api import DEFAULT_MODEL
    from cogvlm_jax.training import run as finetune

    from cogvlm_jax import cli

    runs = []
    monkeypatch.setattr(finetune, "fit", lambda out, run, **kw: runs.append(run) or str(tmp_path / "model"))
    assert cli.main(["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "r"), "--steps", "1"]) == 0
    assert runs[0].model == DEFAULT_MODEL and runs[0].tokenizer is None


def test_a_missing_tokenizer_is_named_before_the_weights_are_read(tmp_path, monkeypatch, capsys):
    """A checkpoint without a tokenizer (CogVLM1's fixture, like the published CogVLM-17B): each verb says
    to pass --tokenizer, and says it before reading any weights."""
    import cogvlm_jax
    from cogvlm_jax.inputs.tokenizer import TokenizerError
    from cogvlm_jax.training import run as finetune

    from cogvlm_jax import api, cli

    def no_reading(*args, **kw):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(api, "read_params", no_reading)
    monkeypatch.setattr(finetune, "read_params", no_reading)
    ckpt = os.path.join(fixture_dir("cogvlm1"), "checkpoint")
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "q", "answer": "a"}\n')
    verbs = [["generate", "--prompt", "hi"], ["chat"], ["serve", "--port", "0"],
             ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]]
    for verb in verbs:
        nope = tmp_path / "nope"
        for extra, message in (([], f"no tokenizer beside the model {ckpt}"),
                               (["--tokenizer", str(nope)], f"--tokenizer {nope} does not exist"),
                               (["--tokenizer", str(tmp_path)], f"--tokenizer {tmp_path} holds no tokenizer.json")):
            assert cli.main([*verb, "--model", ckpt, *extra]) == 2, verb
            err = capsys.readouterr().err
            assert err.startswith(f"cogvlm-jax {verb[0]}: error: {message}") and err.count("\n") == 1, err
            assert not extra or "pass --tokenizer" not in err
            if not extra:
                assert "pass --tokenizer FILE_OR_DIRECTORY" in err and "cogvlm_jax.load" not in err, err
    assert not (tmp_path / "run").exists()
    # The Python API: a tokenizer path that holds none is named, also before any weights are read.
    with pytest.raises(TokenizerError, match=f"tokenizer path {tmp_path / 'nope'} does not exist"):
        cogvlm_jax.load(ckpt, tokenizer=str(tmp_path / "nope"), progress=False)


def test_bad_paths_and_addresses_are_one_line_before_anything_loads(tmp_path, monkeypatch, capsys):
    import socket

    from cogvlm_jax import api, cli

    def no_reading(*args, **kw):
        raise AssertionError("the weights were read")
    monkeypatch.setattr(api, "read_params", no_reading)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "q", "answer": "a"}\n')
    checks = [
        (["serve", "--host", "999.1.1.1", "--port", "0"], "cannot listen on --host 999.1.1.1 --port 0: "),
        (["serve", "--port", str(port)], f"cannot listen on --host 127.0.0.1 --port {port}: Address already in use"),
        (["convert", str(tmp_path / "nope"), str(tmp_path / "out")], f"source checkpoint {tmp_path / 'nope'} does not"),
        (["convert", os.path.join(fixture_dir("cogvlm1"), "checkpoint"), str(a_file)],
         f"destination {a_file} exists and is not a directory"),
        (["generate", "--model", str(a_file), "--prompt", "hi"], f"{a_file} is not valid JSON"),
        (["train", "--data", str(data), "--out", str(a_file), "--steps", "1"],
         f"the run directory {a_file} exists and is not a directory"),
        (["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r"), "--steps", "1"],
         f"training data {tmp_path / 'none.jsonl'} not found"),
    ]
    try:
        for argv, message in checks:
            assert cli.main(argv) == 2, argv
            err = capsys.readouterr().err
            assert err.startswith(f"cogvlm-jax {argv[0]}: error: {message}") and err.count("\n") == 1, err
    finally:
        taken.close()
    assert sorted(os.listdir(tmp_path)) == ["a-file", "d.jsonl"]
