"""The benchmarks (fasttrain.benchmarks, `fasttrain bench`): they run from the installed package, write where they
are told, check each result before timing it, and keep what they measured when a later part fails."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasttrain.benchmarks import (
    bench_adamw,
    bench_attention,
    bench_attention_masks,
    bench_first_step,
    bench_linear_cross_entropy,
    bench_overhead,
    bench_step,
    common,
)
from fasttrain.cli import main

CHECKOUT = Path(__file__).resolve().parents[1]


def run_cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _users_env() -> dict:
    """A user's environment on a CPU: no interpreter, so the CPU kernels and references run."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_a_benchmark_runs_from_the_installed_package_and_writes_under_the_working_directory(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fasttrain.benchmarks.bench_cross_entropy", "--device", "cpu", "--quick"],
        cwd=tmp_path,
        env=_users_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    (written,) = (tmp_path / "benchmarks" / "results").glob("*/cross_entropy.quick.json")
    result = json.loads(written.read_text())
    installed = Path(result["fasttrain_path"])
    assert installed == Path(common.__file__).resolve().parents[1] and not installed.is_relative_to(tmp_path)
    assert not list(installed.rglob("*.json"))  # nothing written into the installed package
    # Outside a checkout there is no commit to name and nothing to compare with.
    assert result["git_commit"] == "unknown" and result["installed_differs_from_checkout"] == []
    assert result["benchmark"] == "cross_entropy" and result["rows"] and result["quick"]


def test_fasttrain_bench_times_every_op_against_torch_and_writes_where_it_is_told(tmp_path):
    # `fasttrain bench` from the console script, in a folder outside the checkout, as a user runs it on a CPU: the ops
    # take their C++ kernels and references (the interpreter would time numpy, not the host path).
    console_script = shutil.which("fasttrain", path=str(Path(sys.executable).parent))
    assert console_script is not None, "the fasttrain console script is not installed beside this Python"
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run(
        [console_script, "bench", "overhead", "--device", "cpu", "--quick", "--out", str(tmp_path / "out")],
        cwd=tmp_path / "elsewhere",
        env=_users_env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # A smoke run's subset goes beside a full run's results, never over them; nothing lands in the working directory.
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["overhead.quick.json"]
    assert list((tmp_path / "elsewhere").iterdir()) == []
    result = json.loads((tmp_path / "out" / "overhead.quick.json").read_text())
    ops = {"layer_norm", "add_layer_norm", "rotary", "attention", "cross_entropy", "decode"}
    impls = ("torch", "fasttrain", "fasttrain, no launch")  # the last from a child process on the Triton path
    aot_ops = ("layer_norm", "add_layer_norm", "rotary", "cross_entropy", "decode")
    aot = {(op, "fasttrain aot, no launch") for op in aot_ops}  # the C++ paths
    assert {(r["op"], r["impl"]) for r in result["rows"]} == {(op, impl) for op in ops for impl in impls} | aot
    # decode's aot row says why it is skipped: the CPU case's caches are fp32, and decode's cubins are fp16/bf16
    (skipped,) = [r for r in result["rows"] if "skipped" in r]
    assert skipped["op"] == "decode" and "fp16 or bf16" in skipped["skipped"]
    assert all(r["host_us"] > 0 for r in result["rows"] if r is not skipped)
    # The cProfile names fasttrain's own functions among the costliest.
    assert any("norms.py" in entry[0] for entry in result["ceilings"]["layer_norm_cprofile"])


def test_fasttrain_bench_refuses_unknown_names(capsys):
    code, out, err = run_cli(capsys, ["bench", "adamw", "flux"])
    assert code == 2 and "flux" in err and len(err.strip().splitlines()) == 1


def test_bench_overhead_keeps_its_op_rows_when_a_later_part_fails(tmp_path, monkeypatch):
    # A part that fails after every op was timed (here the driver-call rows) costs its own rows only.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    def broken(device, calls):
        raise NameError("tl")

    monkeypatch.setattr(bench_overhead, "driver_call_rows", broken)
    monkeypatch.setattr(
        bench_overhead,
        "no_launch_rows",
        lambda device, calls: [
            {"op": op, "mode": mode, "host_us": 1.0}
            for op in bench_overhead.cases(device)
            for mode in ("fwd", "fwd+bwd")
        ],
    )
    # (the aot rows import the Triton kernels here, which with TRITON_INTERPRET unset would leave them compiled-only)
    monkeypatch.setattr(bench_overhead, "aot_no_launch_rows", lambda device, calls: [])
    monkeypatch.setattr(sys, "argv", ["bench_overhead", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="driver calls"):
        bench_overhead.main()
    rows = json.loads((tmp_path / "overhead.quick.json").read_text())["rows"]
    assert {r["op"] for r in rows if r["impl"] == "fasttrain"} == set(bench_overhead.cases("cpu"))
    assert [r for r in rows if r["mode"] == "failed"] == [
        {"op": "driver calls", "mode": "failed", "impl": "-", "skipped": "NameError: tl"}
    ]


def test_bench_overhead_skips_launches_only_inside_its_context():
    import torch.nn.functional as F

    from fasttrain.kernels import norms
    from fasttrain.ops import layer_norm

    kernel, x = norms._norm_forward_kernel, torch.randn(3, 8)
    with bench_overhead.launches_skipped():
        assert norms._norm_forward_kernel is not kernel
        layer_norm(x, (8,), backend="triton")  # runs the op's Python; the kernel is not launched
    assert norms._norm_forward_kernel is kernel
    assert (layer_norm(x, (8,), backend="triton") - F.layer_norm(x, (8,))).abs().max() < 1e-5
    from fasttrain.kernels import attention_backward

    plans = attention_backward._backward_plans
    chosen = plans.cache
    with bench_overhead.launches_skipped():
        assert plans.cache == {} and plans.cache is not chosen
        plans.cache["a key"] = "a plan timed on skipped launches"
    assert plans.cache is chosen and "a key" not in plans.cache


def test_bench_step_keeps_its_rows_when_the_cuda_graph_fails(tmp_path, monkeypatch):
    # The graph row is the one a driver may refuse; on the CPU its GraphedStep is made to fail at its first replay
    # (the correctness check): the rows measured before it are kept.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels and references, as a user runs it
    monkeypatch.setattr(bench_step, "variants", lambda device, quick: ["eager", "fasttrain", "fasttrain+graph"])
    monkeypatch.setattr(bench_step.common, "matmul_tflops", lambda device: 1.0)  # the ceiling's timing, not under test
    why = "operation not permitted when stream is capturing"

    def refused():
        raise RuntimeError(why)

    monkeypatch.setattr(bench_step, "graphed_step", lambda model, opt, x, y: refused)
    monkeypatch.setattr(sys, "argv", ["bench_step", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="fasttrain\\+graph"):
        bench_step.main()
    rows = json.loads((tmp_path / "step.quick.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "fasttrain", "fasttrain+graph"]
    assert all(r["step_ms"] > 0 for r in rows[:2])
    assert rows[2]["skipped"] == f"failed: RuntimeError: {why}"


def test_bench_first_step_times_a_process_from_its_start_to_its_first_step(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    started = time.time()
    row = bench_first_step.child("fasttrain", "cpu", True, started)
    assert row["to_first_step_s"] == pytest.approx(time.time() - started - row["second_step_s"], abs=0.05)
    parts = row["start_and_imports_s"] + row["build_s"] + row["first_step_s"]
    assert row["to_first_step_s"] == pytest.approx(parts) and min(row.values()) > 0 and math.isfinite(row["first_loss"])


def test_bench_first_step_keeps_its_rows_and_refuses_a_wrong_or_failed_one(tmp_path, monkeypatch):
    losses = {"fasttrain": 5.0, "compile": 5.0, "fasttrain+compile": 6.0}  # the last one's first loss is off

    def run_child(variant, device, quick, caches):
        assert (caches / "triton").parent == caches  # one cache folder per variant, shared by its cold and warm runs
        if variant == "compile" and (caches / "ran").exists():
            raise RuntimeError("exit 1: inductor failed")
        (caches / "ran").touch()
        return {"to_first_step_s": 1.0, "first_loss": losses[variant]}

    monkeypatch.setattr(bench_first_step, "run_child", run_child)
    monkeypatch.setattr(bench_first_step, "variants", lambda device, quick: list(losses))
    monkeypatch.setattr(sys, "argv", ["bench_first_step", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="compile warm"):
        bench_first_step.main()
    rows = json.loads((tmp_path / "first_step.quick.json").read_text())["rows"]
    assert [(r["variant"], r["cache"], "skipped" in r) for r in rows] == [
        ("fasttrain", "cold", False),
        ("fasttrain", "warm", False),
        ("compile", "cold", False),
        ("compile", "warm", True),
        ("fasttrain+compile", "cold", True),
        ("fasttrain+compile", "warm", True),
    ]
    assert rows[3]["skipped"] == "failed: exit 1: inductor failed" and "wrong result" in rows[4]["skipped"]


def test_bench_attention_masks_checks_each_provider_before_timing_it(monkeypatch):
    monkeypatch.setattr(common, "time_ms", lambda fn, device: (fn(), 1.0)[1])
    right = bench_attention_masks.providers("cpu")["fasttrain"]
    monkeypatch.setattr(
        bench_attention_masks,
        "providers",
        lambda device: {"fasttrain": right, "sdpa": right, "wrong": lambda q, k, v, mask: right(q, k, v, mask) * 1.01},
    )
    B, H, T, D = 2, 2, 16, 8
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    masks = bench_attention_masks.masks(B, T, "cpu")
    assert set(masks) == {"causal", "right-padded causal", "left-padded causal", "key padding", "documents"}
    rows = bench_attention_masks.bench_mask(
        "documents", masks["documents"], q, k, v, torch.randn_like(q), "cpu", torch.float32
    )
    assert [r["provider"] for r in rows] == ["fasttrain", "sdpa", "wrong"]
    assert rows[0]["max_rel_err"] < 1e-5 and rows[0]["fwd_x_sdpa"] == 1.0
    assert rows[2]["skipped"].startswith("wrong result") and "fwd_ms" not in rows[2]


def test_profile_call_ranks_the_host_ops():
    x = torch.randn(256, 256, requires_grad=True)
    prof = common.profile_call(lambda: (x @ x).sum().backward(), "cpu", top=3)
    names = [name for name, _ in prof["top_cpu"]]
    assert len(names) == 3 and any("mm" in n for n in names) and all(ms >= 0 for _, ms in prof["top_cpu"])


def test_bench_results_record_each_autotuner_choice(tmp_path, monkeypatch):
    # The GPU run's JSON must say which tile won per shape, or benchmarks/NOTES.md cannot explain its numbers.
    import triton

    from fasttrain.kernels import attention

    key, config = (128, 2048, 4, False), triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    monkeypatch.setattr(attention._attn_fwd, "cache", {key: config})
    result = json.loads(common.write_results("attention", "cpu", [{"ms": 1.0}], {}, tmp_path).read_text())
    assert result["autotuned"]["attention._attn_fwd"] == {str(key): str(config)}
    assert "BLOCK_M: 128" in str(config)


def test_benchmarks_check_results_before_timing(monkeypatch):
    # attention: a provider off by a constant is not timed
    bench = bench_attention
    found = bench.providers("cpu")
    monkeypatch.setattr(
        bench,
        "providers",
        lambda device: {
            "fasttrain": lambda q, k, v, causal: found["fasttrain"](q, k, v, causal) + 0.1,
            "eager": found["eager"],
            "nan": lambda q, k, v, causal: found["eager"](q, k, v, causal) * float("nan"),
        },
    )
    rows = bench.bench_shape("cpu", torch.float32, 2, 16, 4, 32, True, ["fwd"])
    assert rows[0]["skipped"].startswith("wrong result") and "fwd_ms" not in rows[0]
    assert rows[1]["max_rel_err"] < 1e-6 and rows[1]["fwd_ms"] > 0
    assert rows[2]["skipped"].startswith("wrong result")
    # attention with score modifiers: each checked against the reference with its own modifiers, timed against plain
    monkeypatch.setattr(
        bench,
        "providers",
        lambda device: {
            "fasttrain": found["fasttrain"],
            "fasttrain_softcap": found["fasttrain_softcap"],
            "fasttrain_alibi": found["fasttrain"],  # the plain kernel under the ALiBi row's name
        },
    )
    rows = bench.bench_shape("cpu", torch.float32, 2, 16, 4, 32, True, ["fwd"])
    assert rows[1]["max_rel_err"] < 1e-5 and rows[1]["vs_plain_fwd"] > 0
    assert rows[2]["skipped"].startswith("wrong result")
    # step: an optimizer that left the weights alone
    step = bench_step
    weights = [torch.randn(4, 4)]
    eager = {"loss": 2.0, "grad_norm": 1.0, "deltas": [1e-3 * torch.randn(4, 4)]}
    assert step.disagreement(dict(eager, deltas=[d + 1e-9 for d in eager["deltas"]]), eager, "cpu") is None
    assert "weight update off by 1" in step.disagreement(dict(eager, deltas=[0 * w for w in weights]), eager, "cpu")
    assert "grad_norm" in step.disagreement(dict(eager, grad_norm=1.1), eager, "cpu")
    assert "loss" in step.disagreement(dict(eager, loss=float("nan")), eager, "cpu")
    # the memory-bound benchmarks' check: the worst pair decides, NaN fails
    want = torch.randn(8, dtype=torch.float64)
    assert common.relative_error([(want.float(), want), (want.float() * 1.001, want)], "op", 1e-2) > 5e-4
    with pytest.raises(AssertionError, match="fasttrain op differs from float64"):
        common.relative_error([(want.float(), want), (want.float() + 1.0, want)], "op", 1e-2)
    with pytest.raises(AssertionError):
        common.relative_error([(want.float() * float("nan"), want)], "op", 1e-2)
    # adamw: betas that a single step cannot tell apart
    adamw = bench_adamw
    real = adamw.AdamW
    monkeypatch.setattr(adamw, "AdamW", lambda params, **kw: real(params, **dict(kw, betas=(0.0, 0.0))))
    with pytest.raises(AssertionError, match="differs from torch"):
        adamw.check_correct([(64, 32), (32,)], "cpu")
    monkeypatch.setattr(adamw, "AdamW", real)
    assert adamw.check_correct([(64, 32), (32,)], "cpu") < 1e-6


def test_adamw_benchmarks_streams_ceiling_moves_adamws_bytes():
    # In the interpreter (conftest): p, m, v += g over a size no block divides; on a CPU no ceiling is reported.
    adamw = bench_adamw
    p, g, m, v = (torch.randn(5000) for _ in range(4))
    want = [t + g for t in (p, m, v)]
    adamw.seven_streams(p, g, m, v, block=1024)
    assert all(torch.equal(got, w) for got, w in zip((p, m, v), want))
    assert adamw.seven_stream_gbs("cpu", 5000) is None


def test_results_say_which_code_ran(tmp_path, monkeypatch):
    import types

    import fasttrain

    monkeypatch.chdir(CHECKOUT)  # the checkout a benchmark compares the installed package with is the one it runs in
    assert common.installed_differs() == []  # the suite runs against a fresh install of this checkout
    copy = tmp_path / "site" / "fasttrain"
    shutil.copytree(Path(fasttrain.__file__).parent, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(copy / "kernels" / "norms.py", "a") as fh:
        fh.write("# an edit not reinstalled\n")
    installed = types.SimpleNamespace(__file__=str(copy / "__init__.py"), __version__=fasttrain.__version__)
    monkeypatch.setattr(common, "fasttrain", installed)
    assert common.installed_differs() == ["kernels/norms.py"]
    result = json.loads(common.write_results("norms", "cpu", [{"ms": 1.0}], {}, tmp_path).read_text())
    assert result["installed_differs_from_checkout"] == ["kernels/norms.py"] and not result["quick"]


def test_bench_linear_cross_entropy_checks_the_loss_and_measures_each_calls_own_memory(monkeypatch):
    """Its correctness check fails on a wrong gradient; the CPU peak is what a call adds (an eager call over (N, V)
    logits adds several N V x 4 bytes, the fused one less); Liger's row says why it cannot run on a CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a user's CPU: the cpu backend, not the interpreter
    bench = bench_linear_cross_entropy
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g).requires_grad_()
    w = (torch.randn(4096, 32, generator=g) / 4).requires_grad_()
    t = torch.randint(0, 4096, (512,), generator=g)
    assert bench.check_correct(x, w, t) < 1e-5
    logits_mb = 512 * 4096 * 4 / 2**20  # 8 MiB
    eager = common.peak_mb(bench.fwd_bwd(bench.eager, x, w, t), "cpu")
    ours = common.peak_mb(bench.fwd_bwd(bench.linear_cross_entropy, x, w, t), "cpu")
    assert eager > 2 * logits_mb and ours < eager, (eager, ours)
    assert "needs CUDA" in bench.variants("cpu")["liger"]
    monkeypatch.setattr(bench, "linear_cross_entropy", lambda x, w, t: 1.01 * F.cross_entropy(F.linear(x, w), t))
    with pytest.raises(AssertionError, match="linear_cross_entropy differs from float64"):
        bench.check_correct(x, w, t)


def test_bench_hf_step_times_only_a_variant_whose_first_step_agrees():
    from fasttrain.benchmarks import bench_hf_step

    want = {"loss": 4.0, "deltas": [1e-3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))]}
    assert (
        bench_hf_step.disagreement(dict(want, deltas=[d * (1 + 1e-6) for d in want["deltas"]]), want, torch.float32)
        is None
    )
    assert "loss" in bench_hf_step.disagreement(dict(want, loss=4.1), want, torch.float32)
    assert "loss" in bench_hf_step.disagreement(dict(want, loss=float("nan")), want, torch.float32)
    assert "weight update" in bench_hf_step.disagreement(
        dict(want, deltas=[2 * want["deltas"][0]]), want, torch.float32
    )
    # Liger's row on a CPU, and for GPT-2 anywhere, says why it cannot run
    assert "needs CUDA" in bench_hf_step.variants("llama", "cpu")["liger"]
    assert "no gpt2 patch" in bench_hf_step.liger_patch("gpt2", "cuda")


def test_bench_overhead_drops_aot_launches_only_inside_its_context():
    import fasttrain._C as C
    from fasttrain.ops import cross_entropy, layer_norm
    from fasttrain.ops.cross_entropy import CROSS_ENTROPY
    from fasttrain.ops.norms import NORMS

    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8)
    target = torch.randint(0, 8, (3,))
    with bench_overhead.aot_launches_dropped("cpu", {torch.float32}):
        assert NORMS.choose(x, 8, None, w, None) == "aot" and CROSS_ENTROPY.choose(x, -100) == "aot"
        layer_norm(x, (8,), w).sum().backward()  # the C++ op and its autograd run; no kernel is launched
        cross_entropy(x, target).backward()
        assert C.aot_records() == [] and C.aot_registered() > 0
    assert C.aot_registered() == 0 and NORMS.choose(x, 8, None, w, None) != "aot"
    assert CROSS_ENTROPY.choose(x, -100) != "aot"


def test_bench_overhead_drops_rotary_aot_launches_only_inside_its_context():
    import fasttrain._C as C
    from fasttrain.ops import apply_rotary_emb
    from fasttrain.ops.rotary import ROTARY

    x, cos, sin = torch.randn(1, 4, 2, 32, requires_grad=True), torch.rand(4, 16), torch.rand(4, 16)
    with bench_overhead.aot_launches_dropped("cpu", {torch.float32}):
        assert ROTARY.choose(x, cos, sin, None, False) == "aot"
        apply_rotary_emb(x, cos, sin).sum().backward()  # the C++ op and its autograd run; no kernel is launched
        assert C.aot_records() == [] and x.grad.shape == x.shape
    assert C.aot_registered() == 0 and ROTARY.choose(x, cos, sin, None, False) != "aot"
