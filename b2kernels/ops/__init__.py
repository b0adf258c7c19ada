"""Ops: each one a pure-torch reference (``reference.py``), Triton kernels (``triton.py``) and a dispatching
public function (``__init__.py``)."""
