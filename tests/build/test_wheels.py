"""The artifacts of `make wheels`: the sdist, the pure-Python wheel and the CUDA wheel, checked
as files, then each installed into a fresh virtualenv next to its torch and smoke-tested from
outside the source tree by tests/wheel_smoke.py.

Runs when STS_WHEELHOUSE names the folder holding them (`make wheels-check`, CI); the CUDA
wheel's tests also need STS_CUDA_PYTHON, a python with the CUDA torch the wheel was built for.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from sts_kernels._abi import abi_tag

WHEELHOUSE = os.environ.get("STS_WHEELHOUSE")
CUDA_PYTHON = os.environ.get("STS_CUDA_PYTHON")
SMOKE = Path(__file__).resolve().parents[1] / "wheel_smoke.py"
MAX_MB = {"pure": 1, "cuda": 20}  # sanity bounds: ~0.07 MB and ~5 MB today

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WHEELHOUSE, reason="STS_WHEELHOUSE is unset (make wheels-check)"),
]
needs_cuda_python = pytest.mark.skipif(
    not CUDA_PYTHON, reason="STS_CUDA_PYTHON is unset (no CUDA wheel without nvcc)"
)


def _artifact(pattern: str) -> Path:
    found = sorted(Path(WHEELHOUSE).glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {WHEELHOUSE}, found {found}"
    return found[0]


def _wheel(kind: str) -> Path:
    return _artifact("sts_kernels-*-py3-none-any.whl" if kind == "pure" else "*+cu*.whl")


def _sdist() -> Path:
    return _artifact("sts_kernels-*.tar.gz")


def _base_version() -> str:
    return _sdist().name.removeprefix("sts_kernels-").removesuffix(".tar.gz")


def _run(*cmd, timeout: int = 600, **kwargs) -> str:
    """Run a command with a clean environment; its stdout, or a failure with its output."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("STS_") and k not in ("PYTHONPATH", "TRITON_INTERPRET")
    }
    env["TRITON_INTERPRET"] = "1"  # the smoke runs the Triton backend on CPU tensors
    done = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout, **kwargs
    )
    assert done.returncode == 0, f"{cmd}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def _site_packages(python: Path | str) -> Path:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    return Path(_run(python, "-c", code).strip())


def _cuda_torch() -> tuple[str, str]:
    code = "import torch; print(torch.__version__, torch.version.cuda)"
    version, cuda = _run(CUDA_PYTHON, "-c", code).split()
    return version, cuda


def _smoke(python: Path, kind: str, cwd: Path) -> dict:
    """tests/wheel_smoke.py KIND, run from `cwd` (outside the source tree)."""
    out = _run(python, SMOKE, kind, cwd=cwd, timeout=300)
    return json.loads(out.strip().splitlines()[-1])


class Venv:
    """A virtualenv into which one sts_kernels artifact at a time is installed."""

    def __init__(self, root: Path, pip: list):
        self.python = root / "bin" / "python"
        self.pip = pip
        self.site = _site_packages(self.python)

    def install(self, artifact: Path, *options: str) -> None:
        """Remove any earlier sts_kernels (the venv holds nothing of it after), then install
        `artifact` alone: everything the package needs must come from it."""
        _run(*self.pip, "uninstall", "-q", "-y", "sts_kernels")
        leftovers = sorted(p.name for p in self.site.glob("sts_kernels*"))
        assert leftovers == [], leftovers
        _run(*self.pip, "install", "-q", "--no-deps", *options, artifact)


@pytest.fixture(scope="module")
def cpu_venv(tmp_path_factory) -> Venv:
    """A fresh venv with this process's (CPU) torch and Triton versions, numpy for Triton's
    interpreter, and the tools to build the sdist (setuptools, wheel, ninja)."""
    root = tmp_path_factory.mktemp("venv-cpu")
    _run(sys.executable, "-m", "venv", root)
    pins = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"triton=={importlib.metadata.version('triton')}",
        "numpy",  # Triton's interpreter (TRITON_INTERPRET=1) imports it
        f"setuptools=={importlib.metadata.version('setuptools')}",
        "wheel",
        "ninja",
    ]
    _run(root / "bin" / "python", "-m", "pip", "install", "-q", *pins)
    return Venv(root, [root / "bin" / "python", "-m", "pip"])


@pytest.fixture(scope="module")
def cuda_venv(tmp_path_factory) -> Venv:
    """A fresh venv whose only other packages are those of STS_CUDA_PYTHON (its CUDA torch,
    Triton, 5.5 GB: reused through a .pth line, not copied), which holds no sts_kernels."""
    cuda_site = _site_packages(CUDA_PYTHON)
    assert not list(cuda_site.glob("sts_kernels*")), f"{cuda_site} already has sts_kernels"
    root = tmp_path_factory.mktemp("venv-cuda")
    _run(CUDA_PYTHON, "-m", "venv", "--without-pip", root)
    venv = Venv(root, [CUDA_PYTHON, "-m", "pip", "--python", root / "bin" / "python"])
    (venv.site / "cuda_torch.pth").write_text(f"{cuda_site}\n")
    return venv


def test_sdist_holds_the_sources_and_nothing_built():
    with tarfile.open(_sdist()) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for needed in ("setup.py", "pyproject.toml", "LICENSE", "README.md", "csrc/sts.cpp"):
        assert needed in names, needed
    assert any(n.startswith("csrc/") and n.endswith(".cu") for n in names)
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    assert not any(n.endswith((".so", ".pyc", "_build.json")) for n in names)


@pytest.mark.parametrize("kind", ["pure", pytest.param("cuda", marks=needs_cuda_python)])
def test_wheel_holds_exactly_the_package(kind):
    wheel = _wheel(kind)
    version = _base_version()
    if kind == "cuda":
        version += "+" + abi_tag(*_cuda_torch())
    assert wheel.name.startswith(f"sts_kernels-{version}-"), (wheel.name, version)
    with tarfile.open(_sdist()) as tar:
        sources = {n.split("/", 1)[1] for n in tar.getnames() if "/sts_kernels/" in n}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"sts_kernels-{version}.dist-info"
        metadata = email.message_from_bytes(zf.read(f"{info}/METADATA"))
        record = json.loads(zf.read("sts_kernels/_build.json"))
    package = {n for n in names if not n.startswith(info)}
    built = {n for n in package if n.startswith("sts_kernels/_C.") and n.endswith(".so")}
    # the package's sources, its build record and (CUDA wheel) the one extension library
    assert (
        package == {n for n in sources if n.endswith(".py")} | {"sts_kernels/_build.json"} | built
    ), sorted(package)
    assert len(built) == (kind == "cuda"), built
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_payload().lstrip().startswith("# sts_kernels")  # the README
    assert record["version"] == version and record["extension"] == (kind == "cuda"), record
    megabytes = wheel.stat().st_size / 1e6
    print(f"{wheel.name}: {megabytes:.2f} MB")
    assert megabytes < MAX_MB[kind], megabytes


def test_pure_wheel_installed_runs_reference_and_triton(cpu_venv, tmp_path):
    cpu_venv.install(_wheel("pure"))
    seen = _smoke(cpu_venv.python, "pure", tmp_path)
    assert seen["backends"] == ["reference", "triton"]


@needs_cuda_python
def test_cuda_wheel_next_to_cpu_torch_warns_and_runs(cpu_venv, tmp_path):
    """The CUDA wheel installed next to the CPU torch: a clear ABI warning at import, the
    extension is not loaded, the package works on the reference / Triton backends."""
    cpu_venv.install(_wheel("cuda"))
    seen = _smoke(cpu_venv.python, "abi-mismatch", tmp_path)
    assert f"this is torch {torch.__version__}" in seen["warning"], seen["warning"]


def test_sdist_builds_from_source_against_this_torch(cpu_venv, tmp_path):
    cpu_venv.install(_sdist(), "--no-build-isolation")
    seen = _smoke(cpu_venv.python, "cpp", tmp_path)
    assert (
        seen["record"]["version"]
        == f"{_base_version()}+{abi_tag(torch.__version__, torch.version.cuda)}"
    )


@needs_cuda_python
def test_cuda_wheel_installed_has_cuda_kernels_for_sm80_sm90_and_ptx(cuda_venv, tmp_path):
    cuda_venv.install(_wheel("cuda"))
    seen = _smoke(cuda_venv.python, "cuda", tmp_path)
    # Triton's interpreter needs numpy, which the CUDA torch does not pull in: the pure wheel's
    # test covers the Triton backend
    assert {"reference", "cpp"} <= set(seen["backends"]), seen["backends"]
