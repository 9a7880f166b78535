"""The package version, in one place: gloro_fast.__version__ and the build (pyproject.toml's
dynamic version) both read it."""
__version__ = "0.1.0"
