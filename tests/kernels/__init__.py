"""Tests of the Triton kernels (CPU: the Triton interpreter)."""
