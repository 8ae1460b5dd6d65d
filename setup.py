"""Build script: metadata lives in pyproject.toml; this file builds the C++ MoE routers.

Both are pybind11 modules that do not link against libtorch (see csrc/README.md): they
build in seconds with plain ``pip install -e .`` and survive torch upgrades.
- ``kcap._router_cpu`` (csrc/router_cpu.cpp) is always built.
- ``kcap._router_cuda`` (csrc/router_cuda.cu) is built only when ``nvcc`` is found (on PATH or
  under CUDA_HOME) and KCAP_NO_CUDA is unset; it links the CUDA runtime statically. If that
  build fails the install goes on without it, and kcap says what is missing when the CUDA
  router is asked for.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pybind11
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import Extension, setup

openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
CUDA_SOURCE = "csrc/router_cuda.cu"


def find_nvcc():
    if os.environ.get("KCAP_NO_CUDA"):
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [Path(home) / "bin" / "nvcc"] if home else []
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    return next((str(c.resolve()) for c in candidates if c.exists()), None)


def cuda_libdir(nvcc: str) -> Path:
    """The folder holding libcudart_static.a for this nvcc (which may be a wrapper script)."""
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = version.split("release ")[-1].split(",")[0] if "release " in version else ""
    roots = [Path(nvcc).parent.parent, Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")),
             Path(f"/usr/local/cuda-{release}"), Path("/usr/local/cuda")]
    for root in roots:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
            if (root / sub / "libcudart_static.a").exists():
                return root / sub
    raise FileNotFoundError(f"libcudart_static.a not found near {nvcc}")


class BuildExt(build_ext):
    """pybind11's build_ext, plus nvcc for the CUDA router (never fatal)."""

    def build_extension(self, ext):
        if ext.name != "kcap._router_cuda":
            return super().build_extension(ext)
        try:
            self._build_cuda(ext)
        except Exception as err:  # noqa: BLE001  (an optional part must never fail the install)
            print(f"warning: the CUDA router was not built ({type(err).__name__}: {err}); kcap "
                  "works without it", file=sys.stderr)

    def _build_cuda(self, ext):
        nvcc = find_nvcc()
        libdir = cuda_libdir(nvcc)
        obj = Path(self.build_temp) / "router_cuda.o"
        obj.parent.mkdir(parents=True, exist_ok=True)
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                               "-gencode=arch=compute_80,code=sm_80",
                               "-gencode=arch=compute_90,code=[sm_90,compute_90]",
                               f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
                               "-c", CUDA_SOURCE, "-o", str(obj)])
        cxx = self.compiler.compiler_cxx[0] if getattr(self.compiler, "compiler_cxx", None) else "c++"
        subprocess.check_call([cxx, "-shared", str(obj), f"-L{libdir}", "-lcudart_static", "-lrt",
                               "-lpthread", "-ldl", "-o", str(target)])


ext_modules = [
    Pybind11Extension("kcap._router_cpu", ["csrc/router_cpu.cpp"], depends=["csrc/arg_errors.h"],
                      cxx_std=17,
                      extra_compile_args=["-O3", *openmp], extra_link_args=openmp),
]
if find_nvcc():
    ext_modules.append(Extension("kcap._router_cuda", sources=[]))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
