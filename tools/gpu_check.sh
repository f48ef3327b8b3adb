#!/usr/bin/env bash
# The GPU checks in one run: build with CUDA, `pytest -m gpu`, then the benchmarks. Logs and JSON go to the folder
# given as $1 (default $OUT) as three files: summary.log (each stage's command, exit status and last lines), run.log
# (everything), and results.tgz holding results/<bench>.json for every GPU benchmark that ran (`tar xzf results.tgz`).
#   usage: tools/gpu_check.sh [OUT_DIR] [stages...]   stages: build probe test bench bench:NAME,... tiles ncu dist
# The default runs build (and Liger Kernel's wheel from .whl/ when carried there), probe (the warp-specialized attention
# kernels' GPU tests alone, under a short limit: should they fail or hang on this Triton, every later stage runs with
# FASTTRAIN_ATTENTION_WS=0), test, the benchmarks overhead, attention (at T 2048 and 8192 unless BENCH_ARGS_attention
# says otherwise; BENCH_ARGS_<name> adds flags to any), step and hf_step, then tiles (tools/ws_tile_probe.py: each
# warp-specialized forward tile pinned alone, right or not and how fast), the other kernels' benchmarks (adamw, norms,
# decode, rotary, cross_entropy, linear_cross_entropy, swiglu), and ncu (Nsight Compute's counters of attention's
# kernels beside cuDNN's and FLASH's: tools/ncu_attention.py). Stages after build share the installed package, so a
# later run on the same machine can take the rest: `tools/gpu_check.sh OUT tiles bench:adamw`.
# A CUDA build also compiles the shipped Triton kernels (tools/aot.py --shipped, CMakeLists.txt), so `info` shows
# the aot column live, test runs its gpu tests (tests/test_norms_aot.py, tests/test_cross_entropy_aot.py: aot
# against triton and the reference) and bench:overhead its "fasttrain aot, no launch" rows beside "fasttrain" (the aot
# path, launches made).
# Each stage is cut at STAGE_TIMEOUT seconds (default 420; the probe's 180) and the whole run at DEADLINE seconds
# after it starts (default 540), so that a hang costs one stage's logs, not the run's; what ran is packed either way.
# dist (not in the default list: `tools/gpu_check.sh OUT build dist`): the trainer under torchrun with FSDP2 over nccl
# on every GPU (one is a valid job), its sharded checkpoint read back by `fasttrain eval`, then bench_adamw_fsdp (the
# optimizer step on FSDP2 shards at 16M and 128M params, fasttrain vs torch fused).
set -uo pipefail
out=${1:-${OUT:?give an output folder}}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the next line changes directory
cd "$(dirname "$0")/.."
shift || true
stages=${*:-build probe test bench:overhead,attention,step,hf_step tiles bench:adamw,norms,decode,rotary,cross_entropy,linear_cross_entropy,swiglu,attention_masks,first_step ncu}
export PYTHONUNBUFFERED=1
# `python -m` puts the working directory first on sys.path, where the source fasttrain/ (no _C, no kernels/) would
# shadow the installed package.
export PYTHONSAFEPATH=1
py=python3
status=0

run_stage() {  # command...
  echo "=== $*" | tee -a "$out/summary.log" >> "$out/run.log"
  local t0=$SECONDS left=$((${DEADLINE:-540} - SECONDS))
  local limit=$((left < ${STAGE_TIMEOUT:-420} ? left : ${STAGE_TIMEOUT:-420}))
  if [ "$limit" -le 5 ]; then echo "=== skipped: deadline" | tee -a "$out/summary.log"; status=1; return 124; fi
  timeout -k 30 "$limit" "$@" > "$out/stage.tmp" 2>&1
  local rc=$?
  cat "$out/stage.tmp" >> "$out/run.log"
  echo "=== exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.log"
  tail -n 25 "$out/stage.tmp" >> "$out/summary.log"
  rm -f "$out/stage.tmp"
  [ $rc -eq 0 ] || status=1
  return $rc
}
ws_tests="warp_specialized"
test_select=()
# The benchmarks' JSON, packed once however the script ends (a stage cut by the deadline, several bench stages).
pack() { [ -d "$out/results" ] && tar czf "$out/results.tgz" -C "$out" results && rm -r "$out/results"; }
trap pack EXIT
# Five C++ files and the CUDA ones: compiled in parallel whichever generator CMake finds.
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
# The shipped Triton cubins of the device's arch only (H100 and H200 are sm_90): half the build's compiles.
export FASTTRAIN_AOT_ARCHS=${FASTTRAIN_AOT_ARCHS:-90}

for stage in $stages; do
  case $stage in
    build)
      run_stage $py -m pip install --no-build-isolation --no-deps -v .
      # Liger Kernel, the peer of bench_hf_step and bench_linear_cross_entropy: its wheel carried in .whl/ (pure Python
      # and Triton; the machine has no network), else their Liger rows say it is not installed.
      for whl in .whl/liger_kernel-*.whl; do [ -e "$whl" ] && run_stage $py -m pip install --no-deps "$whl"; done
      run_stage $py -m fasttrain.cli info ;;
    probe)
      test_select=(-k "not $ws_tests")  # the test stage need not run them again
      if ! STAGE_TIMEOUT=180 run_stage $py -m pytest -m gpu -q -rs -n 12 --timeout 120 -k "$ws_tests" \
          tests/test_attention.py; then
        export FASTTRAIN_ATTENTION_WS=0
        echo "=== the warp-specialized kernels failed: FASTTRAIN_ATTENTION_WS=0 from here on" \
          | tee -a "$out/summary.log"
      fi ;;
    test)
      # xdist: the GPU tests are bound by Triton's compiles, which run on the CPU (16 cores there).
      run_stage $py -m pytest -m gpu -q -rs -n "${TEST_WORKERS:-12}" --timeout 300 --durations 15 \
        "${test_select[@]}" tests ;;
    bench|bench:*)
      names=${stage#bench}; names=${names#:}
      [ -n "$names" ] || names=overhead,attention,step,hf_step,norms,decode,rotary,cross_entropy,linear_cross_entropy,swiglu,adamw
      : "${BENCH_ARGS_attention=--seqlens 2048 8192}"  # the targets' range, in a third of the full sweep's time
      for b in ${names//,/ }; do
        extra="BENCH_ARGS_$b"
        # shellcheck disable=SC2086  # word-split on purpose: the variable holds flags
        run_stage $py -m fasttrain.benchmarks.bench_$b --device cuda --out "$out/results" ${!extra:-}
      done ;;
    tiles)
      run_stage $py tools/ws_tile_probe.py --device cuda --out "$out/results" ;;
    ncu)
      # Nsight Compute over the kernels inside tools/ncu_attention.py's NVTX range, clocks left as the driver sets
      # them; the report stays in $out, its counters go out as CSV.
      ncu_bin=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
      mkdir -p "$out/results"
      run_stage "${ncu_bin:-ncu}" --clock-control none --nvtx --nvtx-include "profiled/" --section SpeedOfLight \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
          --section SchedulerStats --section WarpStateStats -f -o "$out/ncu_attention" $py tools/ncu_attention.py &&
        run_stage bash -c '"$0" --import "$1" --csv --page details > "$2"' "${ncu_bin:-ncu}" \
          "$out/ncu_attention.ncu-rep" "$out/results/ncu_attention.csv" ;;
    dist)
      gpus=$(nvidia-smi --list-gpus | wc -l)
      run_stage $py -m torch.distributed.run --standalone --nproc_per_node "$gpus" -m fasttrain train --preset tiny \
          --dist.strategy fsdp --train.steps 40 --train.checkpoint_interval 20 --train.eval_interval 20 \
          --train.progress_bar false --train.out_dir "$out/dist_fsdp" &&
        run_stage $py -m fasttrain.cli eval --checkpoint "$out/dist_fsdp" --max-batches 4 \
          --data "$($py -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')/json"
      run_stage $py -m fasttrain.benchmarks.bench_adamw_fsdp --device cuda --out "$out/results" ;;
    *) echo "unknown stage $stage (build, probe, test, bench, bench:NAME,..., tiles, ncu, dist)"; exit 2 ;;
  esac
done
exit $status
