"""Build sts_kernels and its C++/CUDA extension `sts_kernels._C`.

Environment:
  STS_NO_EXT=1      install the pure-Python package (reference + Triton backends only)
  STS_FORCE_CUDA=1  compile the CUDA sources even when no GPU is visible (needs nvcc and a
                    CUDA build of torch); TORCH_CUDA_ARCH_LIST picks the architectures
                    (default here: "8.0;9.0")
  MAX_JOBS          parallel compile jobs for ninja
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("STS_NO_EXT", "0") == "1":
        return [], {}
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/bin/nvcc"
    ):
        # cpp_extension guesses CUDA_HOME from the nvcc on PATH; a wrapper script such as
        # /usr/local/bin/nvcc makes that /usr/local, where libcudart is not
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # OpenMP must reach the compiler and the linker, or at::parallel_for runs on one thread.
    # No -std flag: cpp_extension passes the standard this torch's headers need (C++20 from
    # torch 2.14 on).
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    force_cuda = os.environ.get("STS_FORCE_CUDA", "0") == "1"
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or force_cuda)
    )
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            "sts_kernels._C",
            sources,
            define_macros=[("STS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "sts_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
