"""Tests of the ops (reference and compiled C++ backends)."""
