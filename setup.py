"""Build tucker_ops._C from csrc/ with torch.utils.cpp_extension.

CPU sources are always compiled. CUDA sources (csrc/cuda/*.cu) are compiled when
torch is a CUDA build and nvcc is found, unless TUCKER_OPS_CUDA says otherwise:
  TUCKER_OPS_CUDA=1  force the CUDA build (fails loudly if it cannot be done)
  TUCKER_OPS_CUDA=0  never build CUDA sources
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _want_cuda() -> bool:
    flag = os.environ.get("TUCKER_OPS_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if torch.version.cuda is None:
            raise RuntimeError("TUCKER_OPS_CUDA=1 but the installed torch is not a CUDA build")
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("TUCKER_OPS_CUDA=1 but nvcc was not found; set CUDA_HOME")
        return True
    if flag:
        raise RuntimeError(f"TUCKER_OPS_CUDA must be '0' or '1', got {flag!r}")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _has_openmp() -> bool:
    info = torch.__config__.parallel_info()
    return "OpenMP" in info and "OpenMP not found" not in info


def _extension():
    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    cxx_flags = ["-O3", "-std=c++20"]
    if _has_openmp():
        cxx_flags.append("-fopenmp")
    define_macros: list[tuple[str, str | None]] = []
    extra_link_args = ["-fopenmp"] if _has_openmp() else []
    include_dirs = [os.path.join(ROOT, CSRC)]

    if _want_cuda() and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("TUCKER_OPS_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            name="tucker_ops._C",
            sources=cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=extra_link_args,
        )
    return cpp_extension.CppExtension(
        name="tucker_ops._C",
        sources=cpu_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=extra_link_args,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
