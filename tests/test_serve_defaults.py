"""First contact with ``cogvlm-jax serve`` as it starts with no options (the shipped model): the client
examples of README.md and docs/ run as copied, a request without ``max_tokens`` gets the rest of the
context, and the chat page answers with its fields as they open."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import CHROMIUM_FLAGS, chromium_path
from test_serve import assert_error, post

import cogvlm_jax
from cogvlm_jax.cli import build_parser, load_engine_and_config
from cogvlm_jax.generation.buckets import bucket_length
from cogvlm_jax.serving.engine import Engine
from cogvlm_jax.serving.server import BackgroundServer, ServerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))
DEFAULT_URL = "http://127.0.0.1:8000"  # where the examples expect `cogvlm-jax serve`
EXAMPLE = os.path.join(ROOT, "cogvlm_jax", "default_model", "example.png")
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def served():
    """The server ``cogvlm-jax serve`` makes without options (one slot: fewer decode sizes to compile)."""
    engine, config = load_engine_and_config(build_parser().parse_args(["serve", "--slots", "1"]))
    with BackgroundServer(engine, config) as srv:
        yield srv, config


def _examples(lang: str, needle: str) -> list[tuple[str, str]]:
    """(file, code) of every ```lang block of README.md and docs/ that contains ``needle``."""
    out = []
    for path in DOCS:
        for code in re.findall(rf"```{lang}\n(.*?)```", open(path, encoding="utf-8").read(), re.S):
            if needle in code:
                out.append((os.path.relpath(path, ROOT), code))
    return out


def _image_message(query=QUESTION) -> list:
    with open(EXAMPLE, "rb") as f:
        url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": query},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


# ----------------------------------------------------------------------------------------- the examples
def test_client_examples_in_readme_and_docs_run_as_copied(served):
    """Every client example (the openai package's, curl's) run from the checkout against the default
    server, its address the only change: each names the model that server serves and gets its answer."""
    srv, config = served
    python = _examples("python", "openai.OpenAI(")
    shell = _examples("bash", "curl ")
    assert python and shell
    for where, code in python + shell:
        named = re.findall(r"""model["']?\s*[=:]\s*["']([^"']+)["']""", code)
        assert named and set(named) == {config.model_name}, (where, named)
        assert DEFAULT_URL in code, where
    for where, code in python:
        r = subprocess.run([sys.executable, "-c", code.replace(DEFAULT_URL, srv.url)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "red", (where, r.stdout, r.stderr[-2000:])
    for where, code in shell:
        r = subprocess.run(["bash", "-c", code.replace(DEFAULT_URL, srv.url)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, (where, r.stderr)
        assert json.loads(r.stdout)["choices"][0]["message"]["content"] == "red", (where, r.stdout)


# ----------------------------------------------------------------------------------------- max_tokens
def test_a_request_without_max_tokens_is_answered_and_one_that_does_not_fit_is_a_400(served):
    srv, config = served
    url = srv.url + "/v1/chat/completions"
    for key in ("max_tokens", "max_completion_tokens", None):
        body = {"model": config.model_name, "messages": _image_message(), "temperature": 0}
        status, got = post(url, body)
        assert status == 200 and got["choices"][0]["message"]["content"] == "red", got
        prompt = got["usage"]["prompt_tokens"]
        if key is not None:  # the whole context is the prompt's too: it does not fit
            ctx = srv.engine.config.context_length
            assert_error(post(url, {**body, key: ctx - prompt + 1}), 400, "context_length_exceeded", "messages",
                         match=f"max_tokens {ctx - prompt + 1}")
    status, got = post(url, {"messages": _image_message(), "temperature": 0, "stream": False})
    assert status == 200 and got["choices"][0]["finish_reason"] == "stop"  # still serving


def test_without_max_tokens_an_answer_runs_to_the_end_of_the_context():
    """The shipped model given a 512-token context and an eos it never says, served with the default
    options: a request without max_tokens gets every token left, past any fixed default of 256."""
    model = cogvlm_jax.load(progress=False)
    cfg = model.config
    never = cfg.image_token_id  # only ever a prompt's image placeholder
    cfg = dataclasses.replace(cfg, eos_token_ids=(never,),
                              text=dataclasses.replace(cfg.text, max_position_embeddings=512))
    endless = cogvlm_jax.Model(cfg, model.params, model.tokenizer)
    with BackgroundServer(Engine(endless, slots=1), ServerConfig("endless")) as srv:
        url = srv.url + "/v1/chat/completions"
        lengths = []
        for query in ("Where is it?", "Where is it now?", "How many? " * 30):
            status, got = post(url, {"messages": [{"role": "user", "content": query}], "temperature": 0})
            assert status == 200, got
            usage = got["usage"]
            assert usage["completion_tokens"] == 512 - usage["prompt_tokens"] > 256, usage
            assert got["choices"][0]["finish_reason"] == "length"
            lengths.append(usage["prompt_tokens"])
        # each prompt padded to its bucket, the padding taking none of the answer's room: one compile per
        # bucket, not one per prompt length
        assert len(set(lengths)) == 3 and srv.engine.prefill_shapes == {(bucket_length(n), False) for n in lengths}
        assert_error(post(url, {"messages": [{"role": "user", "content": "Where is it?"}], "max_tokens": 512}),
                     400, "context_length_exceeded", "messages")


# ----------------------------------------------------------------------------------------- the page
def test_chat_page_answers_with_its_fields_as_they_open(served):
    """The page's max-tokens field opens empty (no limit): a question about the example picture is
    answered, and a maximum typed that does not fit shows the server's error; the page goes on."""
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    srv, config = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === %s"
                                   % json.dumps(config.model_name))
            assert page.input_value("#max-tokens") == ""

            def ask(question: str, n: int) -> None:
                page.fill("#question", question)
                page.click("#send")
                page.wait_for_function(
                    "n => document.body.dataset.state === 'idle' && "
                    "document.querySelectorAll('.msg.assistant, .msg.error').length === n", arg=n, timeout=120_000)

            page.set_input_files("#image", EXAMPLE)
            page.wait_for_selector("#preview[src^='data:image/png;base64,']", state="attached")
            ask(QUESTION, 1)
            assert page.locator(".msg.error").count() == 0, page.locator(".msg.error").all_inner_texts()
            assert page.locator(".msg.assistant .text").nth(0).text_content() == "red"
            page.fill("#max-tokens", str(srv.engine.config.context_length))
            ask("What shape is it?", 2)
            assert "exceeds" in page.locator(".msg.error").nth(0).text_content()
            page.fill("#max-tokens", "")
            ask("What shape is it?", 3)
            assert page.locator(".msg.assistant .text").nth(1).text_content() == "circle"
        finally:
            browser.close()
