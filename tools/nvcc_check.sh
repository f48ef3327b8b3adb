#!/usr/bin/env bash
# Compile-only check of every csrc/*.cu with nvcc for sm_80 and sm_90 against the installed torch's headers, so CUDA
# code cannot rot on a machine without a GPU (CI). Host code is compiled with -Wall -Wextra as CMakeLists.txt builds
# it, torch's and Python's headers as system headers; any warning (a register spill among them) fails the file. A CPU
# torch wheel lacks c10/cuda/impl/cuda_cmake_macros.h: a two-line stub in a temp dir stands in for it
# (docs/platform.md). Nothing is linked or run.
#   usage: tools/nvcc_check.sh [file.cu ...]     (default: every csrc/*.cu); exit status 1 on any error or warning
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
[ -x "$NVCC" ] || { echo "nvcc not found (set NVCC or put it on PATH)"; exit 2; }
PY=${PYTHON:-python3}
read -r TORCH_INC TORCH_API_INC PY_INC ABI < <("$PY" -c "
import os, sysconfig, torch, torch.utils.cpp_extension as c
inc = c.include_paths()
print(inc[0], os.path.join(inc[0], 'torch', 'csrc', 'api', 'include'), sysconfig.get_paths()['include'],
      int(torch._C._GLIBCXX_USE_CXX11_ABI))")
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$stub/c10/cuda/impl/cuda_cmake_macros.h"
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(csrc/*.cu)
status=0
# One nvcc call per file for both architectures: the host side (most of the time, torch's headers) is compiled once.
for f in "${files[@]}"; do
  if "$NVCC" -c "$f" -o "$stub/out.o" -std=c++17 -O3 -lineinfo \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -fPIC -Xcompiler -Wall,-Wextra -DFASTTRAIN_WITH_CUDA=1 -D_GLIBCXX_USE_CXX11_ABI="$ABI" -Icsrc \
      -isystem "$stub" -isystem "$TORCH_INC" -isystem "$TORCH_API_INC" -isystem "$PY_INC" -Xptxas -warn-spills \
      2>"$stub/err" && ! grep -qi "warning" "$stub/err"; then
    echo "ok    sm_80 sm_90 $f"
  else
    echo "FAIL  sm_80 sm_90 $f"; cat "$stub/err"; status=1
  fi
done
exit $status
