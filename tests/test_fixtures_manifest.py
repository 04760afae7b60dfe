"""The copied reference data is byte-identical to ../shared/fixtures, ../shared/fixtures64 and
../shared/fixtures-video (their MANIFEST.sha256)."""

import hashlib
import os

import pytest
from conftest import FIXTURES, FIXTURES64, FIXTURES_VIDEO


@pytest.mark.parametrize("root", [FIXTURES, FIXTURES64, FIXTURES_VIDEO], ids=os.path.basename)
def test_fixture_copy_matches_manifest(root):
    with open(os.path.join(root, "MANIFEST.sha256")) as f:
        entries = [line.split(maxsplit=1) for line in f if line.strip()]
    assert len(entries) >= 8
    for digest, name in entries:
        with open(os.path.join(root, name.strip()), "rb") as g:
            assert hashlib.sha256(g.read()).hexdigest() == digest, f"{name} differs from the reference"
