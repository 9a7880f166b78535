"""Tests of the GPU code paths (skipped without CUDA; make gpu-check)."""
