"""The checkout's tools/ scripts: the warp-specialized tile probe, the Nsight Compute driver."""

import json
import subprocess
import sys
from pathlib import Path

import torch


def _bench_module(stem: str, folder: str = "tools"):
    """The script folder/stem.py of the checkout (tools/ is no package) loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{folder}_{stem}", Path(__file__).resolve().parents[1] / folder / f"{stem}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ws_tile_probe_runs_each_tile_pinned_in_its_own_process(tmp_path):
    # On a CPU, in the interpreter (conftest), each candidate and v2 on one small shape per head-dim class.
    probe = Path(__file__).resolve().parents[1] / "tools" / "ws_tile_probe.py"
    done = subprocess.run(
        [sys.executable, str(probe), "--device", "cpu", "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "ws_tiles.json").read_text())["rows"]
    tool = _bench_module("ws_tile_probe", "tools")
    want = {("v2", D) for D in (64, 128)} | {
        (",".join(map(str, t)), int(cls[1:])) for cls, tiles in tool.CANDIDATES.items() for t in tiles
    }
    assert {(r["tile"], r["D"]) for r in rows} == want
    assert all(r["right"] and r["nan_rows"] == 0 for r in rows)
    for r in rows:  # the config launched is the one pinned (v2: the interpreter's, not specialized)
        bm, bn, warps, stages = r["tile"].split(",") if r["tile"] != "v2" else (64, 64, 4, 1)
        assert r["ran"] == (
            f"{{'BLOCK_M': {bm}, 'BLOCK_N': {bn}, 'WARP_SPECIALIZE': {r['tile'] != 'v2'}}} w{warps} s{stages}"
        )


def test_ws_tile_probe_calls_nan_or_a_large_error_wrong_and_keeps_a_crash_as_a_row():
    tool = _bench_module("ws_tile_probe", "tools")
    ref = torch.randn(2, 3, 4, 8)
    pytorch = ref + 1e-3
    assert tool.verdict(ref + 1e-3, pytorch, ref)["right"]
    assert not tool.verdict(ref + 3e-3, pytorch, ref)["right"]  # over twice PyTorch's error
    nan = ref.clone()
    nan[1, 2, 0, 5] = float("nan")
    judged = tool.verdict(nan, pytorch, ref)
    assert judged["nan_rows"] == 1 and not judged["right"]
    (row,) = tool.run_child("not,a,tile", "cpu")
    assert not row["right"] and row["failed"].startswith("exit 1") and "ValueError" in row["failed"]


def test_ncu_attention_runs_each_provider_inside_the_range_after_a_warm_up():
    # On a CPU, in the interpreter (conftest): fasttrain alone, at a small shape; the tiles it names are the tuners'.
    tool = Path(__file__).resolve().parents[1] / "tools" / "ncu_attention.py"
    done = subprocess.run([sys.executable, str(tool), "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "fasttrain: forward and backward ran in the range"
    assert lines[1] == "fasttrain forward tile: ({'BLOCK_M': 64, 'BLOCK_N': 64, 'WARP_SPECIALIZE': False}, 4, 1)"
    assert len(lines) == 5 and all(line.startswith("fasttrain d") for line in lines[2:])


def test_aot_host_ab_times_the_three_paths_of_each_aot_op(monkeypatch, capsys):
    """tools/aot_host_ab.py, the interleaved measurement behind NOTES.md's aot host times: run as a script, and its
    --decode and --attention modes through its main() in this process (another interpreter's start and imports
    would cost more than the runs)."""
    tool = Path(__file__).resolve().parent.parent / "tools" / "aot_host_ab.py"
    args = ["--rounds", "1", "--calls", "3"]
    done = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"{op} {mode}"
        for op in ("layer_norm", "add_layer_norm", "rotary", "cross_entropy", "rms_norm", "add_rms_norm")
        for mode in ("fwd", "fwd+bwd")
    ]
    assert all(line.count(" us per call") == 1 and "aot, no launch" in line for line in lines)

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the module sets it; restored after the test
    module = _bench_module("aot_host_ab")
    threads = torch.get_num_threads()  # main() takes one intra-op thread

    def run(mode):
        monkeypatch.setattr(sys, "argv", [str(tool), mode, *args])
        try:
            module.main()
        finally:
            torch.set_num_threads(threads)
        return capsys.readouterr().out.splitlines()

    (line,) = run("--decode")
    assert line.startswith("decode fwd: ") and line.count(" no launch ") == 3 and "torch, 1-row static cache" in line
    assert line.endswith("x)") and "aot / torch" in line
    lines = run("--attention")  # flash_attn_func's call, then the packed function's and SDPA's with a mask
    rows = ("attention", "qkvpacked", "sdpa causal mask", "varlen", "dropout")
    assert [line.split(":")[0] for line in lines] == [f"{row} {mode}" for row in rows for mode in ("fwd", "fwd+bwd")]
    assert all("torch sdpa fp32" in line and "aot / sdpa" in line for line in lines)
    # no launch: the JIT's (the qkvpacked rows: its backward), without the short path, and as it is
    assert [line.count(" no launch ") for line in lines] == [3, 3, 3, 3, 2, 2, 2, 2, 2, 2]


def test_flash_attn_suite_rewrites_a_test_file_and_samples_its_cases(tmp_path):
    """tools/flash_attn_suite.py on a made-up flash-attention checkout: the imports become fasttrain.flash_attn's,
    the devices the CPU, the GPU queries sm90's; per test function --per-test cases run, none past --max-seqlen."""
    tool = _bench_module("flash_attn_suite", "tools")
    source = (
        "import torch\n"
        "from flash_attn import flash_attn_func\n"
        "    from flash_attn.flash_attn_interface import _get_block_size_n, USE_TRITON_ROCM\n"
        "import flash_attn\n"
        'is_sm90 = torch.cuda.get_device_capability("cuda") == (9, 0)\n'
        'big = torch.cuda.get_device_properties("cuda").total_memory > 2**30\n'
        "q = torch.randn(3, device='cuda')  # flash_attn_func on cuda\n"
    )
    text = tool.transform(source)
    assert text.splitlines()[1:4] == [
        "from fasttrain.flash_attn import flash_attn_func",
        "    from fasttrain.flash_attn.flash_attn_interface import _get_block_size_n, USE_TRITON_ROCM",
        "import fasttrain.flash_attn as flash_attn",
    ]
    assert "is_sm90 = (9, 0) == (9, 0)" in text and "big = 2**40 > 2**30" in text
    assert 'q = torch.randn(3, device="cpu")  # flash_attn_func on cuda' in text
    # A checkout whose test file pytest samples: no torch import, so the run costs pytest's start only.
    root = tmp_path / "flash-attention"
    (root / "tests").mkdir(parents=True)
    (root / "tests" / "test_made_up.py").write_text(
        "import pytest\n"
        'DEVICE = "cuda"\n'
        '@pytest.mark.parametrize("seqlen_q,seqlen_k", [(1, 97), (97, 300), (64, 64)])\n'
        '@pytest.mark.parametrize("d", [32, 64])\n'
        "def test_attention(seqlen_q, seqlen_k, d):\n"
        '    assert DEVICE == "cpu" and max(seqlen_q, seqlen_k) <= 128\n'
        "\n"
        "def test_plain():\n"
        "    pass\n"
    )
    out = tmp_path / "suite"
    args = ["--flash-attn", str(root), "--files", "tests/test_made_up.py", "--keep", str(out), "--max-seqlen", "128"]
    done = subprocess.run(
        [sys.executable, tool.__file__, *args, "--per-test", "3", "--", "-v"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = [line.split("::")[1].split()[0] for line in done.stdout.splitlines() if " PASSED" in line]
    assert sum(r.startswith("test_attention[") for r in ran) == 3 and "test_plain" in ran and len(ran) == 4
    assert "3 deselected" in done.stdout and (out / "tests_test_made_up.py").is_file()
    again = subprocess.run([sys.executable, tool.__file__, *args], capture_output=True, text=True)  # out is not empty
    assert again.returncode != 0 and "--keep must be a new or empty directory" in again.stderr
