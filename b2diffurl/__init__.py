"""b2diffurl — thin, fast trainers for B²-DiffuRL, DDPO and D-Fusion (+DPO) on top of b2kernels."""

__version__ = "0.1.0"
