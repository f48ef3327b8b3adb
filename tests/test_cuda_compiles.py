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


# The torch headers that most sources include, precompiled once for the C++ checks: each source that includes them
# itself gets them as -include of the precompiled header (GCC reads header.gch in its place; an unusable one, the
# header's text), so the check sees the declarations the source sees and skips parsing them again (most of its time).
PRECOMPILED = ("ATen/core/Tensor.h", "torch/library.h")


def cxx_command(source: Path | None, precompiled: Path | None = None) -> list[str]:
    """The build's language level, OpenMP and include paths, the warnings as errors, no code generated; source None:
    the flags only."""
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
    command = [CXX, *flags, "-Icsrc", *(f"-isystem{p}" for p in system)]
    if source is None:
        return command
    text = source.read_text()
    if precompiled is not None and all(f"#include <{h}>" in text for h in PRECOMPILED):
        command += ["-include", str(precompiled)]
    return [*command, str(source.relative_to(ROOT))]


def precompile(folder: Path) -> Path | None:
    """PRECOMPILED as folder/precompiled.h and its .gch, with the checks' flags; None if that fails (the checks then
    parse the headers themselves)."""
    header = folder / "precompiled.h"
    header.write_text("".join(f"#include <{h}>\n" for h in PRECOMPILED))
    command = [a for a in cxx_command(None) if a != "-fsyntax-only"]
    command += ["-x", "c++-header", str(header), "-o", f"{header}.gch"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return header if done.returncode == 0 else None


@pytest.fixture(scope="module")
def native_checks(tmp_path_factory):
    """{what: CompletedProcess} of nvcc_check.sh ("nvcc": its runs over every csrc/*.cu, one file each) and of each
    csrc/*.cpp's check, on one worker per core: nvcc's files first (the longest), the C++ checks as workers free up."""
    cu_sources = sorted((ROOT / "csrc").glob("*.cu")) if NVCC is not None else []
    sources = sorted((ROOT / "csrc").glob("*.cpp")) if CXX is not None else []

    def nvcc(source):
        env = {**os.environ, "NVCC": NVCC, "PYTHON": sys.executable}
        command = ["bash", str(ROOT / "tools" / "nvcc_check.sh"), str(source.relative_to(ROOT))]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    def check(source, precompiled):
        command = cxx_command(source, precompiled)
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        cu_runs = [pool.submit(nvcc, s) for s in cu_sources]
        precompiled = precompile(tmp_path_factory.mktemp("precompiled")) if sources else None
        runs = {s.name: pool.submit(check, s, precompiled) for s in sources}
        results = {name: run.result() for name, run in runs.items()}
        if cu_runs:
            done = [run.result() for run in cu_runs]
            results["nvcc"] = subprocess.CompletedProcess(
                [r.args for r in done],
                max(r.returncode for r in done),
                "".join(r.stdout for r in done),
                "".join(r.stderr for r in done),
            )
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
