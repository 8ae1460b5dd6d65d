"""Build script: metadata lives in pyproject.toml; this file builds the C++ MoE router.

The router is a pybind11 module that does not link against libtorch (see csrc/README.md):
it builds in seconds with plain ``pip install -e .`` and survives torch upgrades.
"""
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []

ext_modules = [
    Pybind11Extension("kcap._router_cpu", ["csrc/router_cpu.cpp"], cxx_std=17,
                      extra_compile_args=["-O3", *openmp], extra_link_args=openmp),
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
