"""Throughput suites. Run ``python -m bench --list`` or ``python -m bench SUITE [--quick]``."""
