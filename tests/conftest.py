import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.
# This must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("caml_cache"))


@pytest.fixture(autouse=True)
def _private_cache(_session_cache, monkeypatch):
    """Tests never write to the user's cache (synthetic datasets, decoded volumes); modules that need
    their own cache set CAML_CACHE again in their fixtures."""
    monkeypatch.setenv("CAML_CACHE", _session_cache)
