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


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs with one intra-op thread and restores the count after it (the CLI may change it): on the
    2 shared cores torch's extra threads make tiny ops ~50x slower. Modules may still name it explicitly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill every fresh output allocation of the Triton kernels with NaN, so an element a kernel forgets to
    write shows up as NaN instead of passing by luck. Use with ``pytest.mark.usefixtures("nan_poison")``."""
    from b2kernels.ops.ddim_logprob import triton as ddim_triton
    from b2kernels.ops.kv_inject_attention import triton as kv_triton

    monkeypatch.setattr(ddim_triton, "POISON_OUTPUTS", True)
    monkeypatch.setattr(kv_triton, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
