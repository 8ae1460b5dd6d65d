"""kcap: knowledge-capacity experiments (Physics of Language Models 3.3) on custom kernels.

Importing kcap is light: numpy and torch are imported by the submodules that need them.
"""
__version__ = "0.1.0"
