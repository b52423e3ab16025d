import os

import pytest
import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors.
# This must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Tests never write to the user's cache (synthetic datasets, decoded volumes), module-scoped fixtures
    included; modules that need their own cache set CAML_CACHE again in their fixtures."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAML_CACHE", str(tmp_path_factory.mktemp("caml_cache")))
        yield


@pytest.fixture(autouse=True)
def _restore_threads():
    """A CLI run with --threads changes torch's thread count for the whole test process: restored after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
