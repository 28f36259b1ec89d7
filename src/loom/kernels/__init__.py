"""Loom's own compiled kernels (C++ built at first use), below both models and engine."""
