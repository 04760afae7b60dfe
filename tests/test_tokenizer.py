"""Both tokenizers: loading, special ids, round trips and streaming detokenisation."""

import os
import random

import pytest

from cogvlm_jax.inputs.tokenizer import FastTokenizer, SentencePieceTokenizer, TokenizerError, load_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("cogvlm1", "cogvlm2")
TEXTS = ["Question: What color is the circle? Answer:", "a red star on a blue square\nQuestion: How many?",
         "café 東京 🙂", "  leading and  double  spaces ", "tabs\tand\nnewlines\n\n"]


@pytest.fixture(scope="module", params=FAMILIES)
def tok(request):
    return load_tokenizer(os.path.join(FIXTURES, request.param, "tokenizer"))


# ------------------------------------------------------------------------------------ loading
def test_load_from_file_dir_and_checkpoint_root():
    root = os.path.join(FIXTURES, "cogvlm1")
    for path in (root, os.path.join(root, "tokenizer"), os.path.join(root, "tokenizer", "tokenizer.model")):
        assert isinstance(load_tokenizer(path), SentencePieceTokenizer)
    assert isinstance(load_tokenizer(os.path.join(FIXTURES, "cogvlm2", "tokenizer", "tokenizer.json")),
                      FastTokenizer)


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_a_tokenizer_config_that_is_not_an_object_is_named(tmp_path):
    import shutil

    shutil.copytree(os.path.join(FIXTURES, "cogvlm2", "tokenizer"), tmp_path / "tok")
    for bad, message in (("[]", "must be a JSON object of tokenizer settings, got a list"), ("{", "not valid JSON")):
        (tmp_path / "tok" / "tokenizer_config.json").write_text(bad)
        with pytest.raises(TokenizerError, match=message) as e:
            load_tokenizer(tmp_path / "tok")
        assert str(tmp_path / "tok" / "tokenizer_config.json") in str(e.value)


def test_special_ids():
    t1 = load_tokenizer(os.path.join(FIXTURES, "cogvlm1"))
    assert (t1.bos_id, t1.eos_id, t1.pad_id, t1.vocab_size) == (1, 2, 0, 600)
    assert t1.special_ids == {0, 1, 2}
    t2 = load_tokenizer(os.path.join(FIXTURES, "cogvlm2"))
    assert (t2.bos_id, t2.eos_id, t2.pad_id, t2.vocab_size) == (128000, 128001, None, 128256)
    assert t2.special_ids == set(range(128000, 128256))


# ------------------------------------------------------------------------------ encode / decode
def test_sentencepiece_legacy_llama_encoding():
    tok = load_tokenizer(os.path.join(FIXTURES, "cogvlm1"))
    assert tok.encode("Question: Hi")[0] == tok.token_to_id("▁Question")  # dummy prefix space
    assert tok.encode("Hi", add_special_tokens=True) == [1] + tok.encode("Hi")
    # Special token strings in the text are matched, and the text after one gets its own prefix space.
    assert tok.encode("a</s>b") == tok.encode("a") + [2] + tok.encode("b")
    assert tok.encode("é") == [tok.token_to_id(p) for p in ("▁", "<0xC3>", "<0xA9>")]  # byte fallback


def test_fast_tokenizer_adds_no_specials():
    tok = load_tokenizer(os.path.join(FIXTURES, "cogvlm2"))
    assert tok.encode("Question:") == [493, 25]
    assert tok.encode("x<|end_of_text|>") == tok.encode("x") + [128001]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    decoded = tok.decode(tok.encode(text))
    if isinstance(tok, SentencePieceTokenizer) and "  " in text:
        # The tiny sentencepiece model's normaliser (remove_extra_whitespaces) collapses runs of
        # spaces and trims the ends; the published Llama model keeps them.
        assert decoded == " ".join(text.split())
    else:
        assert decoded == text


def test_decode_skips_or_shows_specials(tok):
    ids = [tok.bos_id] + tok.encode("a red") + [tok.eos_id]
    assert tok.decode(ids) == "a red"
    shown = tok.decode(ids, skip_special_tokens=False)
    assert shown.startswith(tok.decode([tok.bos_id], skip_special_tokens=False)) and "a red" in shown


# ------------------------------------------------------------------------------------ streaming
def _stream(tok, ids, skip=True):
    stream = tok.stream_decoder(skip_special_tokens=skip)
    return [stream.add(i) for i in ids] + [stream.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_add_up_to_decode(tok, text):
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # split characters are held back, never half-printed


def test_stream_holds_back_split_characters(tok):
    ids = tok.encode("東")
    assert len(ids) >= 3  # byte fallback / byte-level: one token per UTF-8 byte in these tiny vocabularies
    assert _stream(tok, ids) == [""] * (len(ids) - 1) + ["東", ""]


def test_stream_keeps_spaces_that_start_a_window():
    # sentencepiece drops all leading whitespace pieces of a text: ["▁", "▁please"] decodes to
    # "please". Inside a stream the same ids must still print their spaces.
    tok = load_tokenizer(os.path.join(FIXTURES, "cogvlm1"))
    space, please = tok.token_to_id("▁"), tok.token_to_id("▁please")
    ids = [tok.token_to_id("bout"), space, please]
    assert "".join(_stream(tok, ids)) == tok.decode(ids) == "bout  please"


@pytest.mark.parametrize("skip", [True, False])
def test_stream_random_ids(tok, skip):
    """Any id sequence (bytes, bare spaces, specials, invalid UTF-8) streams to exactly decode()."""
    rng = random.Random(0)
    ordinary = list(range(min(tok.vocab_size, 700)))
    specials = sorted(tok.special_ids)[:4]
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.choice(ordinary) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip), ids
