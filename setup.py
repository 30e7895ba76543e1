"""Build sts_kernels and its C++/CUDA extension `sts_kernels._C`.

Environment:
  STS_NO_EXT=1      the pure-Python package (reference + Triton backends only), version X.Y.Z
  STS_FORCE_CUDA=1  compile the CUDA sources even when no GPU is visible (needs nvcc and a
                    CUDA build of torch); TORCH_CUDA_ARCH_LIST picks the architectures
                    (default without a GPU: "8.0;9.0+PTX", cubins for sm_80 and sm_90 plus
                    compute_90 PTX that newer GPUs JIT-compile)
  MAX_JOBS          parallel compile jobs for ninja

A build with the extension is ABI-bound to the torch it compiled against, so its version
carries a local tag naming that build: X.Y.Z+cu130torch2.14 (CUDA 13.0, torch 2.14.x) or
X.Y.Z+cputorch2.13. The build also writes `sts_kernels/_build.json` (torch, CUDA, archs),
which `python -m sts_kernels.env` prints and the import checks against the running torch.
"""

import glob
import importlib.util
import json
import os
import re

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGE = "sts_kernels"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _load_abi():
    """sts_kernels/_abi.py on its own: the package's __init__ needs torch and its ops."""
    spec = importlib.util.spec_from_file_location(
        "_sts_abi", os.path.join(ROOT, PACKAGE, "_abi.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ABI = _load_abi()


def _base_version() -> str:
    with open(os.path.join(ROOT, PACKAGE, "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def _cuda_targets(arch_list: str) -> tuple[list[str], list[str]]:
    """("8.0;9.0+PTX") -> (["sm_80", "sm_90"], ["compute_90"]): cubins and PTX."""
    cubins, ptx = [], []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            continue  # a named arch ("Hopper"): torch expands it, the record keeps the raw list
        arch = match.group(1) + match.group(2) + match.group(3)
        cubins.append(f"sm_{arch}")
        if match.group(4):
            ptx.append(f"compute_{arch}")
    return cubins, ptx


def _extension_build():
    """(ext_modules, cmdclass, build record) for the extension, or None for STS_NO_EXT=1."""
    if os.environ.get("STS_NO_EXT", "0") == "1":
        return None
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
    arch_list = ""
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        # without the variable cpp_extension compiles for the visible GPUs
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(
            "{}.{}".format(*torch.cuda.get_device_capability(i))
            for i in range(torch.cuda.device_count())
        )
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        ext = CUDAExtension(
            f"{PACKAGE}._C",
            sources,
            define_macros=[("STS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            f"{PACKAGE}._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    cubins, ptx = _cuda_targets(arch_list)
    record = {
        "extension": True,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,  # the torch build the library links against
        "cuda_kernels": with_cuda,
        "torch_cuda_arch_list": arch_list or None,
        "cuda_archs": cubins,
        "ptx": ptx,
    }
    build_ext = _recording(BuildExtension.with_options(use_ninja=True))
    return [ext], {"build_ext": build_ext}, record


def _write_record(package_dir: str) -> None:
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, ABI.BUILD_FILE), "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, **RECORD}, f, indent=2)
        f.write("\n")


def _recording(command):
    """`command` that also writes the build record next to the extension it builds in place
    (`build_ext --inplace`, editable installs)."""

    class Recording(command):
        def run(self):
            super().run()
            if self.inplace:
                _write_record(os.path.join(ROOT, PACKAGE))

    return Recording


class BuildPy(build_py):
    """Writes the build record into the built package (every wheel has one), or into the
    source tree for an editable install."""

    def run(self):
        super().run()
        target = ROOT if self.editable_mode else self.build_lib
        _write_record(os.path.join(target, PACKAGE))


class Sdist(sdist):
    """The sdist is source for every build: the plain version, no local tag."""

    def run(self):
        self.distribution.metadata.version = _base_version()
        super().run()


built = _extension_build()
ext_modules, cmdclass, RECORD = built or ([], {}, {"extension": False})
VERSION = _base_version()
if RECORD["extension"]:
    VERSION += "+" + ABI.abi_tag(RECORD["torch"], RECORD["torch_cuda"])
setup(
    version=VERSION,
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": BuildPy, "sdist": Sdist},
)
