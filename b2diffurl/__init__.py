"""b2diffurl — thin, fast trainers for B²-DiffuRL, DDPO and D-Fusion (+DPO) on top of b2kernels."""

from importlib import metadata

try:
    __version__ = metadata.version("b2diffurl")  # the single version string lives in pyproject.toml
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
