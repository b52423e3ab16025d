"""Fixtures of the tests that run caml.train / caml.evaluate on the tiny preset: a synthetic-data cache
per test module, the reference ops (these tests are about training, whatever is built); tests/conftest.py
restores torch's thread count after each test."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--threads", "1", "--eval-every", "1000"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("caml_cache"))


@pytest.fixture(autouse=True)
def _env(cache, monkeypatch):
    monkeypatch.setenv("CAML_CACHE", cache)
    monkeypatch.setenv("CAML_OPS_BACKEND", "reference")
