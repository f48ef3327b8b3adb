"""`fasttrain train | eval | info` from the command line: overrides, TOML, resume, and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttrain.cli import main
from fasttrain.config import ConfigError, parse_overrides
from fasttrain.train import RunConfig
from fasttrain.train.config import build
from fasttrain.train.presets import PRESETS, tiny

# The CLI as a CPU user runs it (conftest.cpu_user): C++ kernels and references, not the Triton interpreter.
pytestmark = pytest.mark.usefixtures("cpu_user")


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
    assert build(tiny(), {"model": {"n_head": 8}}).model.head_dim == tiny().model.d_model // 8
    derived = build(tiny(), {"model": {"bias": True, "norm": "rmsnorm"}}).model
    assert derived.qkv_bias and derived.norm_eps == 1e-6
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
