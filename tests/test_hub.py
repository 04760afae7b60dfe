"""Hugging Face Hub ids wherever a checkpoint path goes: ``load``, the CLI and ``convert`` read a Hub id's
snapshot from a Hugging Face cache laid out as ``huggingface_hub`` lays it out, inside the test's temporary
directory (``HF_HUB_CACHE``), with ``HF_HUB_OFFLINE=1``: no test here touches the network."""

from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np
import pytest
from conftest import cases, fixture_dir

from cogvlm_jax import hub

CHECKPOINT = os.path.join(fixture_dir("cogvlm1"), "checkpoint")
TOKENIZER = os.path.join(fixture_dir("cogvlm1"), "tokenizer")
MODEL_ID = "test-org/cogvlm-tiny"
TOKENIZER_ID = "test-org/vicuna-tiny"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def add_snapshot(cache, repo_id: str, commit: str, files: dict, refs=()) -> str:
    """Put ``files`` ({name: source file or bytes}) into ``cache`` as ``huggingface_hub`` stores a download:
    each file's bytes once in ``models--ORG--NAME/blobs/<hash>``, the snapshot ``snapshots/<commit>/`` made
    of relative symlinks to them, and ``refs/<revision>`` holding the commit of each of ``refs``."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for name, src in files.items():
        data = src if isinstance(src, bytes) else open(src, "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snapshot, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


def folder_files(folder: str) -> dict:
    return {name: os.path.join(folder, name) for name in sorted(os.listdir(folder))}


def scaled_checkpoint(out_dir) -> str:
    """The cogvlm1 fixture with every weight halved (not the rotary buffers, which the config fixes): a
    second revision whose numbers differ."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(out_dir)
    shutil.copy(os.path.join(CHECKPOINT, "config.json"), out_dir)
    tensors = {k: v if k.endswith("inv_freq") else (v * 0.5).astype(v.dtype)
               for k, v in load_file(os.path.join(CHECKPOINT, "model.safetensors")).items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding MODEL_ID (main: the fixture, tag v2 / COMMIT_B: its weights halved) and
    TOKENIZER_ID (the fixture's Vicuna-style tokenizer, a repo of its own as upstream); offline."""
    root = tmp_path / "hf-cache"
    add_snapshot(root, MODEL_ID, COMMIT_A, folder_files(CHECKPOINT), refs=("main",))
    halved = scaled_checkpoint(tmp_path / "halved")
    add_snapshot(root, MODEL_ID, COMMIT_B, folder_files(halved), refs=("v2",))
    add_snapshot(root, TOKENIZER_ID, COMMIT_A, folder_files(TOKENIZER), refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"root": str(root), "halved": halved}


def _logits(model):
    a = next(c for c in cases("cogvlm1") if c["name"] == "chat_image")["arrays"]
    return model.forward(a["input_ids"][None], a["token_type_ids"][None], a["attention_mask"][None],
                         a["pixel_values"][None])


def test_the_cache_layout_is_what_huggingface_hub_reads(cache):
    from huggingface_hub import scan_cache_dir, snapshot_download

    for revision, commit in ((None, COMMIT_A), ("v2", COMMIT_B), (COMMIT_B, COMMIT_B)):
        got = snapshot_download(MODEL_ID, revision=revision, cache_dir=cache["root"], local_files_only=True)
        assert os.path.samefile(got, os.path.join(cache["root"], "models--test-org--cogvlm-tiny", "snapshots", commit))
        assert os.path.samefile(hub.resolve(MODEL_ID, revision), got)
    scan = scan_cache_dir(cache["root"])
    assert not scan.warnings, scan.warnings
    assert {r.repo_id for r in scan.repos} == {MODEL_ID, TOKENIZER_ID}


def test_load_by_id_gives_the_numbers_by_path(cache):
    import cogvlm_jax

    by_path = cogvlm_jax.load(CHECKPOINT, tokenizer=TOKENIZER, progress=False)
    by_id = cogvlm_jax.load(MODEL_ID, tokenizer=TOKENIZER_ID, progress=False)
    np.testing.assert_array_equal(_logits(by_id), _logits(by_path))
    text = "What is in the image? Hello </s> wörld"
    assert by_id.tokenizer.encode(text) == by_path.tokenizer.encode(text)


def _same_params(a, b):
    import jax

    assert jax.tree_util.tree_structure(a.params) == jax.tree_util.tree_structure(b.params)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_revision_picks_its_snapshot(cache):
    import cogvlm_jax

    main = cogvlm_jax.load(MODEL_ID, progress=False)
    halved = cogvlm_jax.load(cache["halved"], progress=False)
    assert not np.allclose(_logits(main), _logits(halved))
    for revision in ("v2", COMMIT_B):  # a tag and a commit: the halved weights, so the halved numbers
        _same_params(cogvlm_jax.load(MODEL_ID, revision=revision, progress=False), halved)
    _same_params(cogvlm_jax.load(MODEL_ID, revision="main", progress=False), main)


def test_a_local_directory_wins_over_the_same_id(cache, tmp_path, monkeypatch):
    import cogvlm_jax

    monkeypatch.chdir(tmp_path)
    shutil.copytree(cache["halved"], tmp_path / MODEL_ID)
    assert hub.resolve(MODEL_ID) == MODEL_ID
    _same_params(cogvlm_jax.load(MODEL_ID, progress=False), cogvlm_jax.load(cache["halved"], progress=False))
    with pytest.raises(hub.HubError, match="applies to Hub model ids; test-org/cogvlm-tiny is a local path"):
        hub.resolve(MODEL_ID, "v2")


def test_generate_by_id_prints_what_it_prints_by_path(cache, capsys):
    from cogvlm_jax import cli

    case = next(c for c in cases("cogvlm1") if c["name"] == "chat_image")
    image = os.path.join(fixture_dir("cogvlm1"), "images", case["image"])
    common = ["--image", image, "--prompt", case["query"], "--max-new-tokens", str(case["max_new_tokens"])]
    assert cli.main(["generate", "--model", CHECKPOINT, "--tokenizer", TOKENIZER, *common]) == 0
    by_path = capsys.readouterr().out
    assert cli.main(["generate", "--model", MODEL_ID, "--tokenizer", TOKENIZER_ID, *common]) == 0
    assert capsys.readouterr().out == by_path


def test_convert_by_id_writes_what_convert_by_path_writes(cache, tmp_path):
    import jax
    from cogvlm_jax.convert.checkpoint import restore_params

    from cogvlm_jax import cli

    assert cli.main(["convert", CHECKPOINT, str(tmp_path / "by-path")]) == 0
    assert cli.main(["convert", MODEL_ID, str(tmp_path / "by-id")]) == 0
    assert cli.main(["convert", MODEL_ID, "--revision", "v2", str(tmp_path / "v2-by-id")]) == 0
    assert cli.main(["convert", cache["halved"], str(tmp_path / "v2-by-path")]) == 0
    for a, b in (("by-id", "by-path"), ("v2-by-id", "v2-by-path")):
        pa, pb = restore_params(str(tmp_path / a)), restore_params(str(tmp_path / b))
        assert jax.tree_util.tree_structure(pa) == jax.tree_util.tree_structure(pb)
        for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert open(tmp_path / a / "config.json").read() == open(tmp_path / b / "config.json").read()


@pytest.mark.parametrize("revision", [None, "v9", "c" * 40])
def test_an_id_not_in_the_cache_offline_is_one_line_that_says_so(cache, capsys, revision):
    import cogvlm_jax

    from cogvlm_jax import cli

    repo = "nobody/not-cached" if revision is None else MODEL_ID
    with pytest.raises(hub.HubError) as e:
        cogvlm_jax.load(repo, revision=revision, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and repo in msg and "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE" in msg
    assert (revision is None) or repr(revision) in msg
    verbs = [["generate", "--prompt", "hi", "--model", repo], ["serve", "--model", repo], ["convert", repo, "out"],
             ["chat", "--model", repo], ["plan", "--config", repo], ["compile", "--config", repo],
             ["train", "--data", "x.jsonl", "--out", "run", "--model", repo]]
    for argv in verbs:
        if revision is not None:
            argv = argv + ["--revision", revision]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"cogvlm-jax {argv[0]}: error: {msg}", (argv, err)


def test_a_tokenizer_id_not_in_the_cache_offline_is_refused(cache):
    import cogvlm_jax

    with pytest.raises(hub.HubError, match="lmsys/vicuna-7b-v1.5 is not a local directory and not in the Hugging"):
        cogvlm_jax.load(MODEL_ID, tokenizer="lmsys/vicuna-7b-v1.5", progress=False)


def test_a_cached_repo_of_pickle_weights_only_is_refused(cache):
    import cogvlm_jax
    from cogvlm_jax.files import CheckpointError

    from cogvlm_jax import cli

    add_snapshot(cache["root"], "test-org/pickled", COMMIT_A,
                 {"config.json": os.path.join(CHECKPOINT, "config.json"),
                  "pytorch_model.bin": b"PK\x03\x04 not to be unpickled"}, refs=("main",))
    with pytest.raises(CheckpointError, match=r"holds PyTorch pickle weights \(pytorch_model.bin\) and no safetensors"):
        cogvlm_jax.load("test-org/pickled", progress=False)
    assert cli.main(["convert", "test-org/pickled", os.path.join(cache["root"], "..", "out")]) == 2
    add_snapshot(cache["root"], "test-org/readme", COMMIT_A, {"README.md": b"# a dataset card"}, refs=("main",))
    with pytest.raises(hub.HubError, match="^test-org/readme has no config.json: it is not a model checkpoint"):
        cogvlm_jax.load("test-org/readme", progress=False)


def test_a_snapshot_with_a_missing_shard_is_not_complete(tmp_path):
    src = os.path.join(fixture_dir("cogvlm2"), "checkpoint")
    files = folder_files(src)
    whole = add_snapshot(tmp_path, "o/whole", COMMIT_A, files)
    del files["model-00002-of-00002.safetensors"]
    part = add_snapshot(tmp_path, "o/part", COMMIT_A, files)
    assert hub.complete(whole) and not hub.complete(part)
    assert hub.complete(whole, "config") and not hub.complete(whole, "tokenizer")


@pytest.mark.parametrize("name, is_id", [
    ("THUDM/cogvlm2-llama3-chat-19B", True), ("THUDM/cogvlm-chat-hf", True), ("lmsys/vicuna-7b-v1.5", True),
    ("cogvlm2-llama3-chat-19B", False), ("./THUDM/cogvlm-chat-hf", False), ("/abs/dir", False),
    ("ckpt/a/b", False), ("a/../b", False), ("org--x/name", False), ("org/", False), ("org/name.", False),
])
def test_what_is_spelled_like_a_hub_id(name, is_id):
    assert hub.is_hub_id(name) is is_id


def test_revision_without_an_id_is_refused():
    with pytest.raises(hub.HubError, match="revision 'v2' given without a Hub model id"):
        hub.resolve(None, "v2")


def test_the_patterns_fetch_every_file_we_read_and_no_pickle():
    import fnmatch

    from cogvlm_jax.convert.convert_hf import CARRIED_FILES, INDEX_FILE, SINGLE_FILE
    from cogvlm_jax.inputs.tokenizer import TOKENIZER_CONFIG_FILES
    from cogvlm_jax.inputs.tokenizer import TOKENIZER_FILES as READ

    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in hub.MODEL_FILES)

    wanted = ["config.json", SINGLE_FILE, INDEX_FILE, "model-00001-of-00008.safetensors", "checkpoint.json",
              "params/_METADATA", "params/ocdbt.process_0/d/abc", "generation_config.json", *READ,
              *TOKENIZER_CONFIG_FILES, *CARRIED_FILES]
    assert all(fetched(n) for n in wanted), [n for n in wanted if not fetched(n)]
    for name in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "x.pth", "y.ckpt",
                 "training_args.bin", "optimizer.pt", "README.md", "images/demo.png"):
        assert not fetched(name), name


# --------------------------------------------------------------------------- downloading (a Hub on 127.0.0.1)
DOWNLOAD_SCRIPT = """
import json, os, sys
from cogvlm_jax import cli, hub

out = {"convert": cli.main(["convert", sys.argv[1], sys.argv[2]]), "errors": {}}
for case, repo, revision in [("missing", "nobody/none", None), ("gated", "test-org/gated", None),
                             ("revision", sys.argv[1], "v9"), ("pickled", "test-org/pickled", None),
                             ("down", "test-org/down", None), ("no-config", "test-org/readme", None)]:
    try:
        hub.resolve(repo, revision, progress=False)
        out["errors"][case] = None
    except hub.HubError as e:
        out["errors"][case] = str(e)
os.environ["HF_TOKEN"] = "hf_test"  # a token: the gated repo answers
out["gated_with_token"] = os.path.basename(hub.resolve("test-org/gated", progress=False))
print(json.dumps(out))
"""


def test_an_id_not_cached_is_downloaded_with_only_the_files_we_read(tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    import jax
    from cogvlm_jax.convert.checkpoint import restore_params
    from fake_hub import FakeHub

    from cogvlm_jax import cli

    files = {name: open(path, "rb").read() for name, path in {**folder_files(CHECKPOINT),
                                                              **folder_files(TOKENIZER)}.items()}
    pickle = {"pytorch_model.bin": b"PK\x03\x04 never fetched"}
    extra = {"README.md": b"# tiny", "modeling_cogvlm.py": b"# the published remote code", **pickle}
    refs = {"main": COMMIT_A}
    fake = FakeHub({MODEL_ID: {"files": {**files, **extra}, "refs": refs},
                    "test-org/gated": {"files": files, "refs": refs, "gated": True},
                    "test-org/pickled": {"files": {"config.json": files["config.json"], **pickle}, "refs": refs},
                    "test-org/down": {"files": files, "refs": refs, "down": True},
                    "test-org/readme": {"files": {"README.md": b"# a dataset card"}, "refs": refs}})
    cache = tmp_path / "hf-cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=fake.url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(cache),
               HF_HUB_DISABLE_TELEMETRY="1")
    try:
        r = subprocess.run([sys.executable, "-c", DOWNLOAD_SCRIPT, MODEL_ID, str(tmp_path / "by-id")], env=env,
                           capture_output=True, text=True, timeout=300, cwd=os.path.dirname(__file__))
    finally:
        fake.close()
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["convert"] == 0, r.stderr[-3000:]
    # only what we read, from every repo: never the pickle weights, nor files we do not use
    assert fake.fetched() == {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                              "modeling_cogvlm.py"}, fake.log
    errors = out["errors"]
    assert all(m is not None and "\n" not in m for m in errors.values()), errors
    assert errors["missing"].startswith("no local directory nobody/none and no model nobody/none on the Hugging")
    assert "test-org/gated is a gated repo" in errors["gated"] and "hf auth login" in errors["gated"]
    assert errors["revision"] == f"{MODEL_ID} has no revision 'v9' on the Hugging Face Hub"
    assert "publishes PyTorch pickle weights (pytorch_model.bin) and no safetensors" in errors["pickled"]
    assert errors["down"].startswith("no local directory test-org/down, and the Hugging Face Hub cannot be "
                                     "reached for test-org/down"), errors["down"]
    assert errors["no-config"] == "test-org/readme has no config.json: it is not a model checkpoint in the " \
                                  "Hugging Face layout"
    assert out["gated_with_token"] == COMMIT_A
    # the download is the checkpoint: converted, the same as by path; then read offline from the cache
    assert cli.main(["convert", CHECKPOINT, str(tmp_path / "by-path")]) == 0
    pa, pb = restore_params(str(tmp_path / "by-id")), restore_params(str(tmp_path / "by-path"))
    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    carried = {"tokenizer.model", "tokenizer_config.json", "modeling_cogvlm.py"}  # from the snapshot
    assert set(os.listdir(tmp_path / "by-id")) == set(os.listdir(tmp_path / "by-path")) | carried
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import cogvlm_jax

    by_id = cogvlm_jax.load(MODEL_ID, progress=False)  # the tokenizer from the same snapshot
    by_path = cogvlm_jax.load(CHECKPOINT, tokenizer=TOKENIZER, progress=False)
    np.testing.assert_array_equal(_logits(by_id), _logits(by_path))
    assert by_id.tokenizer.encode("Hello there") == by_path.tokenizer.encode("Hello there")


def test_serve_by_id_names_the_model_after_the_repo(cache):
    import cogvlm_jax
    from cogvlm_jax.cli import build_parser, load_engine_and_config

    args = build_parser().parse_args(["serve", "--model", MODEL_ID, "--revision", "v2", "--tokenizer", TOKENIZER_ID,
                                    "--slots", "1"])
    engine, config = load_engine_and_config(args)
    assert config.model_name == "cogvlm-tiny"
    _same_params(engine.model, cogvlm_jax.load(cache["halved"], progress=False))


def test_train_records_the_snapshot_of_its_id(cache, tmp_path):
    """A run keeps the directory it started from: a resumed or exported run reads that commit's files."""
    from cogvlm_jax.cli import _run_config, build_parser

    argv = ["train", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "run"), "--model", MODEL_ID,
            "--tokenizer", TOKENIZER_ID, "--revision", COMMIT_B]
    run = _run_config(build_parser().parse_args(argv))
    assert os.path.samefile(run.model, hub.resolve(MODEL_ID, COMMIT_B)) and run.model.endswith(COMMIT_B)
    assert os.path.samefile(run.tokenizer, hub.resolve(TOKENIZER_ID, kind="tokenizer"))
    with pytest.raises(ValueError, match="--revision is the revision of --model's Hub id"):
        _run_config(build_parser().parse_args(["train", "--out", str(tmp_path / "run"), "--resume",
                                               "--revision", "v2"]))


def test_a_model_id_without_a_tokenizer_names_the_flag_and_vicunas(cache, capsys):
    from cogvlm_jax import cli

    assert cli.main(["generate", "--model", MODEL_ID, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cogvlm-jax generate: error: no tokenizer beside the model {MODEL_ID} ") and "\n" not in err
    assert "--tokenizer lmsys/vicuna-7b-v1.5" in err
