"""The native sources compile clean without a GPU: every csrc/*.cu with nvcc for sm_80 and sm_90 (tools/nvcc_check.sh),
and every csrc/*.cpp with the C++ compiler, both under -Wall -Wextra as CMakeLists.txt builds them, any warning of
ours an error (torch's, pybind11's and Python's headers are system headers, as in the build). Skipped only where the
compiler is absent.

The C++ check is front end only (-fsyntax-only: what -Wall -Wextra find in the source, a few seconds a file); the
optimizer's warnings (-Wmaybe-uninitialized and the like) show in the build itself.
"""

import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
CXX = shutil.which("c++") or shutil.which("g++")


def cxx_command(source: Path) -> list[str]:
    """The build's language level, OpenMP and include paths, the warnings as errors, no code generated."""
    import pybind11

    system = [*torch.utils.cpp_extension.include_paths(), sysconfig.get_paths()["include"], pybind11.get_include()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        "-std=gnu++17",
        "-fopenmp",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fsyntax-only",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
    ]
    return [CXX, *flags, "-Icsrc", *(f"-isystem{p}" for p in system), str(source.relative_to(ROOT))]


@pytest.fixture(scope="module")
def native_checks():
    """{what: CompletedProcess} of nvcc_check.sh and of each csrc/*.cpp's check, run side by side: nvcc (one process,
    most of the time) on one core while the C++ checks share the others."""
    nvcc = None
    if NVCC is not None:
        env = {**os.environ, "NVCC": NVCC, "PYTHON": sys.executable}
        command = ["bash", str(ROOT / "tools" / "nvcc_check.sh")]
        nvcc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    if CXX is not None:

        def check(source):
            return subprocess.run(cxx_command(source), cwd=ROOT, capture_output=True, text=True, timeout=300)

        sources = sorted((ROOT / "csrc").glob("*.cpp"))
        workers = max(1, (os.cpu_count() or 1) - (nvcc is not None))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = dict(zip((s.name for s in sources), pool.map(check, sources)))
    if nvcc is not None:
        stdout, stderr = nvcc.communicate(timeout=600)
        results["nvcc"] = subprocess.CompletedProcess(nvcc.args, nvcc.returncode, stdout, stderr)
    return results


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_every_cuda_source_compiles_for_sm80_and_sm90(native_checks):
    sources = sorted((ROOT / "csrc").glob("*.cu"))
    assert sources, "no csrc/*.cu found"
    result = native_checks["nvcc"]
    assert result.returncode == 0, f"nvcc failed:\n{result.stdout}\n{result.stderr}"
    for src in sources:
        assert f"ok    sm_80 sm_90 csrc/{src.name}" in result.stdout, result.stdout


@pytest.mark.skipif(CXX is None, reason="no C++ compiler found")
def test_every_cpp_source_compiles_without_warnings(native_checks):
    checked = {name: r for name, r in native_checks.items() if name.endswith(".cpp")}
    assert len(checked) >= 2, "csrc/*.cpp not found"
    failed = [f"{name}:\n{r.stderr[-3000:]}" for name, r in checked.items() if r.returncode or r.stderr.strip()]
    assert not failed, "\n".join(failed)
