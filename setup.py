"""Build and install gloro_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as
``gloro_fast.kernels``. Compiled C++/CUDA extensions (``csrc/``) are added by the
compiled-ops work; until then the package is pure Python.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["gloro_fast", "gloro_fast.*"]) + ["gloro_fast.kernels"]

setup(
    name="gloro_fast",
    version="0.1.0",
    description="Globally-Robust Neural Networks (GloRo Nets) in PyTorch with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"gloro_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "mlxtend",
            "matplotlib",
            "triton",
            "ninja",
            "pybind11",
        ],
    },
    entry_points={"console_scripts": ["gloro-fast=gloro_fast.cli:main"]},
)
