"""Tests of the sound certificates."""
