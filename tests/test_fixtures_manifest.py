"""The copied reference data is byte-identical to ../shared/fixtures (MANIFEST.sha256)."""

import hashlib
import os

from conftest import FIXTURES


def test_fixture_copy_matches_manifest():
    with open(os.path.join(FIXTURES, "MANIFEST.sha256")) as f:
        entries = [line.split(maxsplit=1) for line in f if line.strip()]
    assert len(entries) > 20
    for digest, name in entries:
        with open(os.path.join(FIXTURES, name.strip()), "rb") as g:
            assert hashlib.sha256(g.read()).hexdigest() == digest, f"{name} differs from the reference"
