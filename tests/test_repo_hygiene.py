"""The repository itself: a short README that opens with its two commands, and no history wording.

The README is a user guide. Its first two shell blocks are what a new user and CI run (``.ci/run`` runs
the second one word for word), so they are pinned here exactly. Design notes, numerics and measurements
live in ``docs/``.

Code, tests, benchmarks and docs say what is and why. Wording that points into the project's history
(work sessions, tracker issues by number, an old design file, "was X, now Y") means nothing to a reader
of the tree and goes stale; the second test lists every such line as ``file:line``.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_MAX_LINES = 200

# README.md lines 3-14, word for word: the first two fenced blocks and the line introducing each.
RUN_AN_ANSWER = """\
python3 -m venv .venv && . .venv/bin/activate && pip install .
cogvlm-jax generate --image cogvlm_jax/default_model/example.png --prompt "What color is the circle?"
"""
RUN_THE_TESTS = """\
python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]'
python -m pytest -q
"""
README_OPENING = f"""\
# cogvlm-jax

Run an answer (fresh machine, from this checkout):
```bash
{RUN_AN_ANSWER}```

Run the tests:
```bash
{RUN_THE_TESTS}```
"""

# History wording, matched case-insensitively, one pattern per kind of reference.
HISTORY_PATTERNS = (
    r"\bsessions? #?\d",  # "session 7", "sessions 6 and 7", "measured in session 4"
    r"\b(?:this|that|one|previous|last|earlier|later|next) session\b",  # "tried this session"
    r"\bmeasured in (?:a |an |this |that |the )?(?:\w+ )?session\b",  # "measured in the last session"
    r"(?<!github )(?<!jax )(?<!xla )\bissues?[ -]#?\d",  # "issue 5", "issue #6", "issue-6"; not "jax issue 123"
    r"\bDESIGN facts?\b",  # a numbered fact of a design file
    r"\bDESIGN\.md\b",
    r"\bwas [\d.]+\S* ?\S*,? now\b",  # "was 2.3x, now 4.3x"
    r"[(;] ?was [\d.]+",  # "(was 2459 MB)", "; was 249.5 tok/s"
    r"\bbefore (?:this|the|that) (?:session|change|fix|refactor)\b",
)
HISTORY = re.compile("|".join(f"(?:{p})" for p in HISTORY_PATTERNS), re.IGNORECASE)

SKIPPED = ("tests/fixtures/", "tests/fixtures64/", "tests/fixtures-video/")  # the reference fixtures, copied verbatim from their source


def tracked_text_files() -> list[str]:
    """Every file git tracks, but the fixtures, this file and binary files (a NUL byte, or not UTF-8)."""
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    this = pathlib.Path(__file__).resolve().relative_to(ROOT).as_posix()
    paths = []
    for path in out.decode().split("\0"):
        if not path or path == this or path.startswith(SKIPPED) or not (ROOT / path).is_file():
            continue
        data = (ROOT / path).read_bytes()
        if b"\0" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        paths.append(path)
    return paths


def history_hits(paths) -> list[str]:
    """``file:line: text`` of every line matching a history pattern."""
    hits = []
    for path in paths:
        for n, line in enumerate((ROOT / path).read_text(encoding="utf-8").splitlines(), 1):
            if HISTORY.search(line):
                hits.append(f"{path}:{n}: {line.strip()}")
    return hits


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order; the body ends with a newline."""
    blocks, lang, body = [], None, []
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "".join(body)))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; at most {README_MAX_LINES} (details go in docs/)"


def test_readme_opens_with_the_two_commands_word_for_word():
    text = README.read_text(encoding="utf-8")
    assert fenced_blocks(text)[:2] == [("bash", RUN_AN_ANSWER), ("bash", RUN_THE_TESTS)]
    assert text.startswith(README_OPENING), "README.md lines 1-14 must stay exactly as pinned in this test"


def test_links_in_the_readme_and_docs_resolve():
    """Every relative link of README.md and docs/*.md names a file or folder of the checkout."""
    link = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
    broken = []
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in link.findall(page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert (ROOT / "docs").is_dir() and not broken, broken


def test_the_patterns_catch_history_and_spare_plain_prose():
    for wording in ("measured in session 4", "sessions 6 and 7", "Tried this session", "see issue #6",
                    "issue 10 asks for", "the issue-6 leftovers", "the loss is DESIGN fact 15", "DESIGN.md",
                    "peak RSS 408 MB (was 2304 MB)", "batch 16: 351.2 tok/s; was 249.5", "was 2.3x, now 4.3x",
                    "measured before this change", "measured in the previous session"):
        assert HISTORY.search(wording), wording
    for prose in ('@pytest.fixture(scope="session")', "file a GitHub issue", "this issue is known upstream",
                  "see jax issue 12345", "the request was cancelled", "leaves the destination as it was",
                  "the LayerNorm is applied before the residual add", "a session token"):
        assert not HISTORY.search(prose), prose


def test_no_history_wording_in_the_tree():
    hits = history_hits(tracked_text_files())
    if hits:
        pytest.fail(f"{len(hits)} lines point into the project's history (say what is and why instead):\n"
                    + "\n".join(hits), pytrace=False)
