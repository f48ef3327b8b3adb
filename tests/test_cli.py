"""`fasttrain train | eval | info` from the command line: overrides, TOML, resume, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttrain.cli import main
from fasttrain.config import ConfigError, parse_overrides
from fasttrain.train import RunConfig
from fasttrain.train.config import build
from fasttrain.train.presets import PRESETS, tiny


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(6):
        (folder / f"m{f}.py").write_text("".join(f"def g_{f}_{i}(y):\n    return y * {i % 5}\n\n" for i in range(30)))
    return folder


def tiny_args(tmp_path, corpus, *extra):
    """A CLI run of a few steps of a tiny model (head_dim 8: reference attention, a few ms per step)."""
    return [
        "train",
        "--preset",
        "tiny",
        "--model.n_layer",
        "1",
        "--model.n_head",
        "4",
        "--model.d_model",
        "32",
        "--model.max_seq_len",
        "32",
        "--train.seq_len",
        "32",
        "--train.batch_size",
        "4",
        "--train.steps",
        "12",
        "--optim.warmup_steps",
        "2",
        "--train.eval_interval",
        "6",
        "--train.eval_batches",
        "2",
        "--train.checkpoint_interval",
        "6",
        "--train.progress_bar",
        "false",
        "--train.sample_tokens",
        "8",
        "--train.out_dir",
        str(tmp_path / "run"),
        "--data.paths",
        str(corpus),
        "--data.num_workers",
        "0",
        "--data.val_fraction",
        "0.2",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def test_overrides_are_typed_and_derived_sizes_follow_their_inputs():
    over = parse_overrides(
        RunConfig,
        [
            "--model.d_model",
            "256",
            "--optim.lr=3e-4",
            "--train.compile",
            "--optim.max_grad_norm",
            "none",
            "--data.paths",
            "a.txt,b/",
        ],
    )
    assert over == {
        "model": {"d_model": 256},
        "optim": {"lr": 3e-4, "max_grad_norm": None},
        "train": {"compile": True},
        "data": {"paths": ["a.txt", "b/"]},
    }
    cfg = build(tiny(), over)
    assert cfg.model.d_model == 256 and cfg.model.d_ff == 1024 and cfg.train.compile and cfg.optim.lr == 3e-4
    assert build(tiny(), {"model": {"d_model": 256, "d_ff": 300}}).model.d_ff == 300
    assert build(tiny(), {"model": {"n_head": 8}}).model.n_kv_head == 8
    assert set(PRESETS) >= {"default", "tiny", "gpt2-small"}
    assert PRESETS["gpt2-small"]().train.precision == "bf16"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.n_layr", "4"], "unknown config key 'model.n_layr'"),
        (["--modle.n_layer", "4"], "unknown config key 'modle.n_layer'"),
        (["--model.n_layer", "four"], "--model.n_layer expects int, got 'four'"),
        (["--train.compile", "maybe"], "--train.compile expects bool"),
        (["--optim.lr"], "--optim.lr needs a value"),
        (["--model"], "--model is a section"),
        (["n_layer=4"], "expected an override like --section.field VALUE"),
    ],
)
def test_bad_overrides_raise_config_errors(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_overrides(RunConfig, args)


def run_cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, corpus: ["--data.paths", str(tmp / "missing")], "missing"),
        (lambda tmp, corpus: ["--data.paths", str((tmp / "empty").mkdir() or tmp / "empty")], "empty"),
        (lambda tmp, corpus: ["--train.seq_len", "64"], "train.seq_len (64) exceeds model.max_seq_len (32)"),
        (lambda tmp, corpus: ["--model.n_kv_head", "3"], "model: n_kv_head (3) must divide n_head (4)"),
        (lambda tmp, corpus: ["--train.precision", "fp8"], "train: precision must be one of"),
        (lambda tmp, corpus: ["--config", str(tmp / "nope.toml")], "config file"),
        (lambda tmp, corpus: ["--resume", str(tmp)], "is not a run directory"),
    ],
)
def test_user_mistakes_end_with_one_line_and_exit_code_2(tmp_path, capsys, make_args, message):
    corpus = write_corpus(tmp_path / "corpus")
    code, out, err = run_cli(capsys, tiny_args(tmp_path, corpus, *make_args(tmp_path, corpus)))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fasttrain: error: ") and message in lines[0], err


def test_a_toml_unknown_key_from_the_console_script_prints_no_traceback(tmp_path):
    (tmp_path / "bad.toml").write_text("[model]\nn_layer = 2\n[optim]\nlearning_rate = 1e-3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fasttrain.cli", "train", "--config", str(tmp_path / "bad.toml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "fasttrain: error: unknown config key 'optim.learning_rate' (known in this "
        "section: backend, beta1, beta2, eps, lr, max_grad_norm, min_lr_ratio, schedule, "
        "warmup_steps, weight_decay)"
    )
    (tmp_path / "wrong.toml").write_text('[train]\nsteps = "many"\n')
    proc = subprocess.run(
        [sys.executable, "-m", "fasttrain.cli", "train", "--config", str(tmp_path / "wrong.toml")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "fasttrain: error: train.steps expects int, got 'many' (str)"


def test_train_with_toml_then_resume_then_eval(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "corpus")
    (tmp_path / "cfg.toml").write_text('[optim]\nschedule = "linear"\nlr = 0.004\n[model]\nnorm = "rmsnorm"\n')
    code, out, err = run_cli(capsys, tiny_args(tmp_path, corpus, "--config", str(tmp_path / "cfg.toml")))
    assert code == 0, err
    assert "train loss" in out and "val loss" in out and "--- sample ---" in out
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["optim"]["schedule"] == "linear" and saved["optim"]["lr"] == 0.004
    assert saved["model"]["norm"] == "rmsnorm" and saved["model"]["n_layer"] == 1 and saved["train"]["steps"] == 12

    # A refused resume (the batches would differ) must leave config.json as it was for the next plain resume.
    code, out, err = run_cli(
        capsys, ["train", "--resume", str(tmp_path / "run"), "--train.steps", "18", "--train.batch_size", "8"]
    )
    assert code == 2 and "batch_size" in err
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == saved

    # Resume the finished run with more steps: the saved config is the base, the override extends it. The run is named
    # by --train.out_dir, whose preset (warmup 30 > 18 steps) would not validate: only the run's config must.
    code, out, err = run_cli(
        capsys,
        [
            "train",
            "--resume",
            "--train.out_dir",
            str(tmp_path / "run"),
            "--train.steps",
            "18",
            "--optim.schedule",
            "linear",
        ],
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "training_metrics.json").read_text())
    assert metrics["steps"] == list(range(1, 19))

    code, out, err = run_cli(
        capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--max-batches", "3"]
    )
    assert code == 0, err
    fields = out.split()
    assert fields[0] == "loss" and float(fields[1]) > 0 and fields[2] == "perplexity" and fields[4] == "accuracy"
    assert 0.0 <= float(fields[5]) <= 1.0

    code, out, err = run_cli(capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "x")])
    assert code == 2 and err.startswith("fasttrain: error:") and len(err.strip().splitlines()) == 1
    code, out, err = run_cli(
        capsys, ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(corpus), "--seq-len", "33"]
    )
    assert code == 2 and "--seq-len 33 exceeds the model's max_seq_len 32" in err

    # Greedy generation streams exactly what the library's generate() returns for the same checkpoint.
    from fasttrain.generate import generate
    from fasttrain.train.build import load_for_inference

    model, tokenizer, _ = load_for_inference(tmp_path / "run")
    expected = generate(
        model,
        [tokenizer.encode("def f(")],
        20,
        temperature=0.0,
        stop_tokens=[tokenizer.eot_id],
        vocab_size=tokenizer.vocab_size,
    )
    code, out, err = run_cli(
        capsys,
        [
            "generate",
            "--checkpoint",
            str(tmp_path / "run"),
            "--prompt",
            "def f(",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
        ],
    )
    assert code == 0, err
    assert out == "def f(" + tokenizer.decode(expected.tokens[0]) + "\n"
    assert "tokens/s" in err
    code, out, err = run_cli(
        capsys, ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x", "--max-new-tokens", "100000"]
    )
    assert code == 2 and "--max-new-tokens" in err and len(err.strip().splitlines()) == 1
    # A 30-token prompt leaves room for 3 new tokens in max_seq_len 32 (the last one is never fed back), as
    # generate() allows; 4 is one too many.
    code, out, err = run_cli(
        capsys, ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x" * 30, "--max-new-tokens", "4"]
    )
    assert code == 2 and "--max-new-tokens 4" in err and "use at most 3" in err
    for limit in (["--max-new-tokens", "3"], []):  # without the flag: min(200, room), not an error
        code, out, err = run_cli(
            capsys,
            ["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "x" * 30, "--temperature", "0", *limit],
        )
        assert code == 0, err


def test_bench_runs_a_benchmark_and_refuses_unknown_names(tmp_path, capsys):
    code, out, err = run_cli(capsys, ["bench", "adamw", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert code == 0, err
    # A smoke run's subset goes beside a full run's results, never over them.
    assert not (tmp_path / "adamw.json").exists()
    result = json.loads((tmp_path / "adamw.quick.json").read_text())
    assert result["benchmark"] == "adamw" and result["rows"] and result["device_type"] == "cpu" and result["quick"]
    code, out, err = run_cli(capsys, ["bench", "adamw", "flux"])
    assert code == 2 and "flux" in err and len(err.strip().splitlines()) == 1


def _bench_module(stem: str = "common", folder: str = "benchmarks"):
    """A file of benchmarks/ (or tools/; not packages) loaded as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"{folder}_{stem}", Path(__file__).resolve().parents[1] / folder / f"{stem}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_overhead_times_every_op_against_torch(tmp_path, capsys, monkeypatch):
    # As a user runs it on a CPU: the ops take their references (the interpreter would time numpy, not the host path).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, out, err = run_cli(capsys, ["bench", "overhead", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    assert code == 0, err
    result = json.loads((tmp_path / "overhead.quick.json").read_text())
    ops = {"layer_norm", "add_layer_norm", "rotary", "attention", "cross_entropy", "decode"}
    impls = ("torch", "fasttrain", "fasttrain, no launch")  # the last from a child process on the Triton path
    assert {(r["op"], r["impl"]) for r in result["rows"]} == {(op, impl) for op in ops for impl in impls}
    assert all(r["host_us"] > 0 for r in result["rows"])
    # The cProfile names fasttrain's own functions among the costliest.
    assert any("norms.py" in entry[0] for entry in result["ceilings"]["layer_norm_cprofile"])


def test_bench_overhead_keeps_its_op_rows_when_a_later_part_fails(tmp_path, monkeypatch):
    # On the H200 (2026-12-04) the launch floor raised after every op had been timed, and nothing was written.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bench = _bench_module("bench_overhead")

    def broken(device, calls):
        raise NameError("tl")

    monkeypatch.setattr(bench, "driver_call_rows", broken)
    monkeypatch.setattr(
        bench,
        "no_launch_rows",
        lambda device, calls: [
            {"op": op, "mode": mode, "host_us": 1.0} for op in bench.cases(device) for mode in ("fwd", "fwd+bwd")
        ],
    )
    monkeypatch.setattr(sys, "argv", ["bench_overhead.py", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="driver calls"):
        bench.main()
    rows = json.loads((tmp_path / "overhead.quick.json").read_text())["rows"]
    assert {r["op"] for r in rows if r["impl"] == "fasttrain"} == set(bench.cases("cpu"))
    assert [r for r in rows if r["mode"] == "failed"] == [
        {"op": "driver calls", "mode": "failed", "impl": "-", "skipped": "NameError: tl"}
    ]


def test_bench_overhead_skips_launches_only_inside_its_context():
    import torch.nn.functional as F

    from fasttrain.kernels import norms
    from fasttrain.ops import layer_norm

    bench = _bench_module("bench_overhead")
    kernel, x = norms._norm_forward_kernel, torch.randn(3, 8)
    with bench.launches_skipped():
        assert norms._norm_forward_kernel is not kernel
        layer_norm(x, (8,), backend="triton")  # runs the op's Python; the kernel is not launched
    assert norms._norm_forward_kernel is kernel
    assert (layer_norm(x, (8,), backend="triton") - F.layer_norm(x, (8,))).abs().max() < 1e-5
    from fasttrain.kernels import attention_backward

    plans = attention_backward._backward_plans
    chosen = plans.cache
    with bench.launches_skipped():
        assert plans.cache == {} and plans.cache is not chosen
        plans.cache["a key"] = "a plan timed on skipped launches"
    assert plans.cache is chosen and "a key" not in plans.cache


def test_bench_step_keeps_its_rows_when_the_cuda_graph_fails(tmp_path, monkeypatch):
    # The graph row is the one a driver may refuse; on the CPU its GraphedStep is made to fail at its first replay
    # (the correctness check), which before 2026-12-04's second session lost every row (a refused capture did not).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels and references, as a user runs it
    step = _bench_module("bench_step")
    monkeypatch.setattr(step, "variants", lambda device, quick: ["eager", "fasttrain", "fasttrain+graph"])
    monkeypatch.setattr(step.common, "matmul_tflops", lambda device: 1.0)  # the ceiling's timing, not under test
    why = "operation not permitted when stream is capturing"

    def refused():
        raise RuntimeError(why)

    monkeypatch.setattr(step, "graphed_step", lambda model, opt, x, y: refused)
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--device", "cpu", "--quick", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="fasttrain\\+graph"):
        step.main()
    rows = json.loads((tmp_path / "step.quick.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["eager", "fasttrain", "fasttrain+graph"]
    assert all(r["step_ms"] > 0 for r in rows[:2])
    assert rows[2]["skipped"] == f"failed: RuntimeError: {why}"


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


def test_profile_call_ranks_the_host_ops():
    x = torch.randn(256, 256, requires_grad=True)
    prof = _bench_module().profile_call(lambda: (x @ x).sum().backward(), "cpu", top=3)
    names = [name for name, _ in prof["top_cpu"]]
    assert len(names) == 3 and any("mm" in n for n in names) and all(ms >= 0 for _, ms in prof["top_cpu"])


def test_bench_results_record_each_autotuner_choice(tmp_path, monkeypatch):
    # The GPU run's JSON must say which tile won per shape, or benchmarks/NOTES.md cannot explain its numbers.
    import triton

    from fasttrain.kernels import attention

    common = _bench_module()
    key, config = (128, 2048, 4, False), triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    monkeypatch.setattr(attention._attn_fwd, "cache", {key: config})
    result = json.loads(common.write_results("attention", "cpu", [{"ms": 1.0}], {}, tmp_path).read_text())
    assert result["autotuned"]["attention._attn_fwd"] == {str(key): str(config)}
    assert "BLOCK_M: 128" in str(config)


def test_benchmarks_check_results_before_timing(monkeypatch):
    # attention: a provider off by a constant is not timed
    bench = _bench_module("bench_attention")
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
    # step: an optimizer that left the weights alone
    step = _bench_module("bench_step")
    weights = [torch.randn(4, 4)]
    eager = {"loss": 2.0, "grad_norm": 1.0, "deltas": [1e-3 * torch.randn(4, 4)]}
    assert step.disagreement(dict(eager, deltas=[d + 1e-9 for d in eager["deltas"]]), eager, "cpu") is None
    assert "weight update off by 1" in step.disagreement(dict(eager, deltas=[0 * w for w in weights]), eager, "cpu")
    assert "grad_norm" in step.disagreement(dict(eager, grad_norm=1.1), eager, "cpu")
    assert "loss" in step.disagreement(dict(eager, loss=float("nan")), eager, "cpu")
    # the memory-bound benchmarks' check: the worst pair decides, NaN fails
    common = _bench_module()
    want = torch.randn(8, dtype=torch.float64)
    assert common.relative_error([(want.float(), want), (want.float() * 1.001, want)], "op", 1e-2) > 5e-4
    with pytest.raises(AssertionError, match="fasttrain op differs from float64"):
        common.relative_error([(want.float(), want), (want.float() + 1.0, want)], "op", 1e-2)
    with pytest.raises(AssertionError):
        common.relative_error([(want.float() * float("nan"), want)], "op", 1e-2)
    # adamw: betas that a single step cannot tell apart
    adamw = _bench_module("bench_adamw")
    real = adamw.AdamW
    monkeypatch.setattr(adamw, "AdamW", lambda params, **kw: real(params, **dict(kw, betas=(0.0, 0.0))))
    with pytest.raises(AssertionError, match="differs from torch"):
        adamw.check_correct([(64, 32), (32,)], "cpu")
    monkeypatch.setattr(adamw, "AdamW", real)
    assert adamw.check_correct([(64, 32), (32,)], "cpu") < 1e-6


def test_adamw_benchmarks_streams_ceiling_moves_adamws_bytes():
    # In the interpreter (conftest): p, m, v += g over a size no block divides; on a CPU no ceiling is reported.
    adamw = _bench_module("bench_adamw")
    p, g, m, v = (torch.randn(5000) for _ in range(4))
    want = [t + g for t in (p, m, v)]
    adamw.seven_streams(p, g, m, v, block=1024)
    assert all(torch.equal(got, w) for got, w in zip((p, m, v), want))
    assert adamw.seven_stream_gbs("cpu", 5000) is None


def test_results_say_which_code_ran(tmp_path, monkeypatch):
    import shutil
    import types

    import fasttrain

    common = _bench_module()
    assert common.installed_differs() == []  # the suite runs against a fresh install of this checkout
    copy = tmp_path / "site" / "fasttrain"
    shutil.copytree(Path(fasttrain.__file__).parent, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    with open(copy / "kernels" / "norms.py", "a") as fh:
        fh.write("# an edit not reinstalled\n")
    monkeypatch.setattr(common, "fasttrain", types.SimpleNamespace(__file__=str(copy / "__init__.py")))
    assert common.installed_differs() == ["kernels/norms.py"]
    result = json.loads(common.write_results("norms", "cpu", [{"ms": 1.0}], {}, tmp_path).read_text())
    assert result["installed_differs_from_checkout"] == ["kernels/norms.py"] and not result["quick"]


def test_readme_table_formats_counts_and_dimensions():
    table = _bench_module("readme_table", "tools")
    assert [
        table._fmt(1_068_863_488, "params"),
        table._fmt(1_062_016, "params"),
        table._fmt(128_256, "V"),
        table._fmt(50_257, "V"),
        table._fmt(2.5e-3, "ms"),
    ] == ["1,069M", "1.06M", "128,256", "50257", "0.0025"]


def test_info_still_works(capsys, monkeypatch):
    code, out, _ = run_cli(capsys, ["info"])
    assert code == 0 and out.startswith("fasttrain ")
    import platform

    from fasttrain.info import cpu_name

    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert cpu_name() not in ("", platform.machine()) and cpu_name() in out
    monkeypatch.setenv("FASTTRAIN_BACKEND", "bogus")  # would fail every op call: info says so
    code, out, _ = run_cli(capsys, ["info"])
    assert code == 0 and "FASTTRAIN_BACKEND: " in out and "bogus" in out


def test_a_closed_pipe_ends_the_output_quietly():
    # `fasttrain info | head -1`: the reader is gone before the first write (its end closed before the start).
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fasttrain.cli", "info"], stdout=write, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write)
    assert proc.returncode == 1 and proc.stderr == ""
