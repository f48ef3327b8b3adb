"""Reliability against bad input: every CLI option's wrong type and range, eval's and generate's options, TOML
sections that are not tables, and BPE on a line without spaces; each refused in one line before any data is read."""

import dataclasses
import random
import time
import typing

import pytest
from reliability_helpers import (
    make_corpus,
    make_done_run,
    one_error_line,
)

from fasttrain.cli import main
from fasttrain.data.tokenizers import MAX_PIECE, train_bpe
from fasttrain.train import RunConfig

pytestmark = pytest.mark.usefixtures("cpu_user")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def done_run(tmp_path_factory, corpus_dir):
    return make_done_run(tmp_path_factory, corpus_dir)


# -- 5. TOML sections of the wrong type; 6. BPE on a line without spaces


@pytest.mark.parametrize(
    "toml, message",
    [
        ("model = 3", "model must be a table of keys ([model] in TOML), got 3 (int)"),
        ('optim = "fast"', "optim must be a table of keys ([optim] in TOML), got 'fast' (str)"),
        ("train = [1]", "train must be a table of keys ([train] in TOML), got [1] (list)"),
        ("[data]\npaths = 1", "data.paths expects list[str], got 1 (int)"),
    ],
)
def test_a_toml_section_that_is_not_a_table_is_an_error(tmp_path, capsys, toml, message):
    # An override of the same section after it (--model.n_layer) used to replace the 3 with a fresh table.
    (tmp_path / "bad.toml").write_text(toml + "\n")
    code = main(
        [
            "train",
            "--config",
            str(tmp_path / "bad.toml"),
            "--model.n_layer",
            "1",
            "--train.out_dir",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_bpe_training_on_a_1_mb_line_without_spaces_takes_seconds():
    rng = random.Random(0)
    line = "".join(rng.choices("ACGT", k=1_000_000))  # a DNA string: one 1 MB "word" to the GPT-2 split
    start = time.perf_counter()
    tok = train_bpe(iter([line, "def f(x):\n    return x\n"]), 300)
    assert time.perf_counter() - start < 30  # quadratic in the line, it did not finish in minutes
    assert tok.decode(tok.encode(line[:5000])) == line[:5000]
    assert max(len(tok.decode([i])) for i in range(tok.vocab_size)) <= MAX_PIECE


# -- 7. the CLI's bad-input table: in-process main() calls, each refused before any data is read


def config_fields():
    """(section.field, the field's type) for every field of every section of RunConfig."""
    sections = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        hints = typing.get_type_hints(sections[section.name])
        for f in dataclasses.fields(sections[section.name]):
            yield f"{section.name}.{f.name}", hints[f.name]


def refused(capsys, tmp_path, *args):
    """main's exit code and its one error line, for a command that must not create its out_dir. The data folder
    is missing: a config that were accepted would end there, not train the default corpus."""
    first = ["--train.out_dir", str(tmp_path / "never"), "--data.paths", str(tmp_path / "no_data")]
    code = main(["train", *first, *args])
    line = one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "never").exists()
    return code, line


def test_every_option_of_the_wrong_type_is_one_line(tmp_path, capsys):
    checked = 0
    for key, tp in config_fields():
        options = typing.get_args(tp) or (tp,)
        if int in options or float in options:
            wrong = "1x"
        elif bool in options:
            wrong = "maybe"
        else:
            continue  # a str or list[str] takes any text
        code, line = refused(capsys, tmp_path, f"--{key}", wrong)
        assert code == 2 and f"--{key} expects" in line and repr(wrong) in line, (key, line)
        checked += 1
    assert checked >= 40


RANGES = [
    ("model.n_layer", "0"),
    ("model.n_head", "-2"),
    ("model.n_kv_head", "3"),
    ("model.d_model", "30"),
    ("model.max_seq_len", "0"),
    ("model.dropout", "1"),
    ("model.rope_theta", "nan"),
    ("model.rope_theta", "inf"),
    ("model.norm", "batchnorm"),
    ("model.activation", "relu6"),
    ("optim.lr", "0"),
    ("optim.lr", "nan"),
    ("optim.beta1", "1"),
    ("optim.beta2", "-0.5"),
    ("optim.beta2", "nan"),
    ("optim.eps", "-1e-8"),
    ("optim.weight_decay", "inf"),
    ("optim.max_grad_norm", "0"),
    ("optim.max_grad_norm", "nan"),
    ("optim.schedule", "exp"),
    ("optim.warmup_steps", "-1"),
    ("optim.min_lr_ratio", "2"),
    ("optim.backend", "triton"),
    *((f"train.{name}", "0") for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_interval")),
    *((f"train.{name}", "0") for name in ("eval_batches", "checkpoint_interval", "keep_last", "log_interval")),
    ("train.max_bad_steps", "0"),
    ("train.early_stopping_patience", "0"),
    ("train.seed", "-1"),
    ("train.sample_tokens", "-1"),
    ("train.precision", "fp8"),
    ("train.device", "tpu"),
    ("train.on_nan", "ignore"),
    ("train.out_dir", ""),
    ("train.on_nan", "skip --train.cuda_graph --train.device cuda"),
    ("data.val_fraction", "1.5"),
    ("data.val_fraction", "-0.1"),
    ("data.num_workers", "-1"),
    ("data.max_decompressed_bytes", "0"),
    ("data.jsonl_field", ""),
]


def test_every_option_out_of_range_is_one_line(tmp_path, capsys):
    for key, value in RANGES:
        code, line = refused(capsys, tmp_path, f"--{key}", *value.split(" "))
        assert code == 2 and key.split(".")[1] in line, (key, value, line)


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("eval", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        ("eval", ["--seq-len", "-3"], "--seq-len must be >= 1, got -3"),
        ("eval", ["--max-batches", "0"], "--max-batches must be >= 1, got 0"),
        ("generate", ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        ("generate", ["--temperature", "-1"], "temperature"),
        ("generate", ["--top-k", "0"], "top_k"),
        ("generate", ["--top-p", "1.5"], "top_p"),
        ("generate", ["--prompt", ""], "--prompt must encode to at least one token"),
    ],
)
def test_a_bad_eval_or_generate_option_is_one_line(done_run, corpus_dir, capsys, command, args, message):
    base = ["--checkpoint", str(done_run)]
    base += ["--data", str(corpus_dir)] if command == "eval" else ["--prompt", "def", "--max-new-tokens", "2"]
    try:
        code = main([command, *base, *args])
    except SystemExit as e:  # argparse's own checks: its usage line, then the error line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err
