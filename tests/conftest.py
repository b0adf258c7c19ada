"""Shared test setup.

Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be set before triton is
imported, hence here). GPU-only tests carry ``@pytest.mark.gpu`` and skip with a reason.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The tests use tiny tensors: intra-op threading only adds overhead (and collapses on an oversubscribed box).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible: torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module, restoring the previous count after it (for modules that run real
    models: on the 2 shared cores torch's extra threads make tiny ops ~50x slower). Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
