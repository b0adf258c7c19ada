"""Importing ``bench`` from the tests. bench/ lives in the checkout, not in the installed wheel, and the README's
``python3 -P -m pytest`` keeps the checkout off ``sys.path`` so that the tests exercise the installed package.
:func:`from_checkout` puts the checkout on ``sys.path`` only while a bench module is imported, so
``b2diffurl`` and ``b2kernels`` keep coming from wherever the test run took them (bench imports them lazily)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def checkout_on_path():
    """The checkout first on ``sys.path`` inside the block, and off it again after."""
    sys.path.insert(0, str(ROOT))
    try:
        yield
    finally:
        sys.path.remove(str(ROOT))


def from_checkout(name: str):
    """``importlib.import_module(name)`` (e.g. ``"bench.latent_toy"``) from the checkout."""
    with checkout_on_path():
        return importlib.import_module(name)
