#!/usr/bin/env bash
# The CPU test suite under the GPU machine's torch and Triton, in a side venv, so that what a version skew breaks is
# found on the CPU: Dynamo in one torch release may refuse to trace what another traces through, and a graph break at
# every op makes a compiled step no faster than eager. The versions are read off the newest GPU result
# (benchmarks/results/nvidia-*/). torch comes from PyPI as its CUDA build (~4.6 GB installed with its CUDA libraries,
# which import without a GPU), so the build compiles the .cu sources with this machine's nvcc, as the GPU build does;
# numpy < 2.3, since triton 3.6.0's interpreter takes int() of a one-element array, which numpy 2.4 refuses. Not for
# CI (the download takes minutes, the suite in the side venv about as long as CI's).
#   usage: tools/gpu_versions_check.sh [VENV_DIR] [pytest args...]   (default VENV_DIR /tmp/fasttrain-gpu-versions)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/fasttrain-gpu-versions}
shift || true
read -r torch_version triton_version < <(python3 - <<'EOF'
import json
import pathlib
runs = [json.loads(p.read_text()) for p in pathlib.Path("benchmarks/results").glob("nvidia-*/*.json")]
newest = max(runs, key=lambda r: r["date"])
print(newest["torch"].split("+")[0], newest["triton"])
EOF
)
echo "the GPU machine's versions (newest result): torch $torch_version, triton $triton_version"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$torch_version" "triton==$triton_version" "numpy<2.3" scikit-build-core pybind11 \
  ninja pytest-xdist
# A build folder of its own: the checkout's build/ holds CMake's cache for CI's torch.
"$venv/bin/pip" install -q --no-build-isolation -C build-dir="$venv/fasttrain-build" ".[test]"
"$venv/bin/pytest" -n 2 -p no:warnings "$@"
