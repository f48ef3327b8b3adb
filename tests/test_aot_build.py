"""FASTTRAIN_AOT_ARCHS, which picks the shipped cubins' archs (tools/aot_build.cmake), takes effect at the next build of
a reused build folder, reconfigured or not. No CUDA configure runs here: a tiny CMake project adds the real step
(fasttrain_add_aot) over a stand-in tools/aot.py that writes the archs it was given as index.json and counts its runs.
Skipped only where cmake is absent.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CMAKE = shutil.which("cmake")
# Ninja, which the build uses where it is installed (scikit-build-core's choice), else Make; Make's run is slow when
# both are there.
NINJA = shutil.which("ninja") is not None
GENERATORS = [pytest.param("Unix Makefiles", marks=[pytest.mark.slow] if NINJA else []), *(["Ninja"] if NINJA else [])]

_AOT_PY = """
import argparse, json, pathlib
p = argparse.ArgumentParser()
p.add_argument("--arch", nargs="+")
p.add_argument("--dtype", nargs="+")
p.add_argument("--shipped", action="store_true")
p.add_argument("--out")
p.add_argument("--kernels-dir")
p.add_argument("--jobs")
a = p.parse_args()
out = pathlib.Path(a.out)
assert not any(out.iterdir()), "the step must empty the folder first"
(out / "index.json").write_text(json.dumps(a.arch))
with open(pathlib.Path(__file__).parent / "runs", "a") as f:
    f.write("run\\n")
"""


def _project(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    (source / "tools").mkdir(parents=True)
    (source / "kernels").mkdir()
    (source / "kernels" / "attention.py").write_text("")
    (source / "tools" / "aot.py").write_text(_AOT_PY)
    script = (ROOT / "tools" / "aot_build.cmake").as_posix()
    (source / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.18)\nproject(aot_step NONE)\n"
        f'include("{script}")\nfasttrain_aot_archs(_archs)\n'
        f'fasttrain_add_aot("${{CMAKE_CURRENT_SOURCE_DIR}}" "{Path(sys.executable).as_posix()}" 1)\n'
    )
    return source


def _run(args: list[str], archs: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FASTTRAIN_AOT_ARCHS", "CMAKE_GENERATOR")}
    if archs is not None:
        env["FASTTRAIN_AOT_ARCHS"] = archs
    return subprocess.run([CMAKE, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CMAKE is None, reason="cmake not found")
@pytest.mark.parametrize("generator", GENERATORS)
def test_a_changed_aot_archs_recompiles_in_a_reused_build_folder_without_a_reconfigure(tmp_path, generator):
    source, build = _project(tmp_path), tmp_path / "build"
    runs, out = source / "tools" / "runs", build / "aot"

    def build_with(archs: str | None) -> None:
        result = _run(["--build", str(build)], archs)
        assert result.returncode == 0, result.stdout + result.stderr

    result = _run(["-S", str(source), "-B", str(build), "-G", generator], "90")
    assert result.returncode == 0, result.stdout + result.stderr
    build_with("90")
    assert json.loads((out / "index.json").read_text()) == ["90"]
    build_with("90")  # unchanged: the step is up to date
    assert runs.read_text().count("run") == 1
    build_with("80 ,90")  # changed, no reconfigure
    assert json.loads((out / "index.json").read_text()) == ["80", "90"]
    assert runs.read_text().count("run") == 2
    build_with("none")  # none ships an empty folder (fasttrain/_aot.py: no index.json)
    assert out.is_dir() and not any(out.iterdir())
    assert runs.read_text().count("run") == 2
    build_with(None)  # unset: both
    assert json.loads((out / "index.json").read_text()) == ["80", "90"]
    assert runs.read_text().count("run") == 3
    result = _run(["--install", str(build), "--prefix", str(tmp_path / "prefix")], None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "prefix" / "fasttrain" / "kernels" / "aot" / "index.json").read_text()) == [
        "80",
        "90",
    ]
    result = _run(["--build", str(build)], "70")
    assert result.returncode != 0 and "FASTTRAIN_AOT_ARCHS: expected some of 80 and 90" in result.stdout + result.stderr


@pytest.mark.skipif(CMAKE is None, reason="cmake not found")
@pytest.mark.parametrize("archs", ["70", "90,sm_80", " , "])
def test_a_bad_aot_archs_stops_the_configure_with_the_variable_named(tmp_path, archs):
    source = _project(tmp_path)
    result = _run(["-S", str(source), "-B", str(tmp_path / "build")], archs)
    assert result.returncode != 0
    assert "FASTTRAIN_AOT_ARCHS: expected some of 80 and 90" in result.stderr and repr(archs) in result.stderr
