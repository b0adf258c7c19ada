"""Glue to third-party libraries (diffusers). The only place in b2kernels allowed to import them."""
