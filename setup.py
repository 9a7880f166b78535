"""Build and install gloro_fast.

- ``gloro_fast._C``: the compiled custom ops (``csrc/``). The C++ CPU kernels are always
  built; the CUDA kernels (``csrc/cuda``) are added when torch has CUDA and nvcc is found
  (``TORCH_CUDA_ARCH_LIST`` defaults to sm_80 and sm_90). Set ``GLORO_FAST_NO_EXTENSION=1``
  for a pure-Python install (every op then runs on its reference implementation).
- The Triton kernels in the top-level ``kernels/`` folder install as ``gloro_fast.kernels``.

Build with the installed torch: ``pip install --no-build-isolation -e .`` (``make install``).
The project's metadata and the single-sourced version are in ``pyproject.toml``.
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

# The metadata (name, version, dependencies, extras, entry points) is in pyproject.toml.
setup(
    packages=packages,
    package_dir={"gloro_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
