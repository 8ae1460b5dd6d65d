"""Build script. Metadata lives in pyproject.toml; this file exists so that the C++ MoE
router in csrc/ can be added as a pybind11 extension without changing how kcap installs."""
from setuptools import setup

# No compiled extension yet: the router issue adds ext_modules here.
setup()
