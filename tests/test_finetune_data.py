"""`fasttrain train` on prompt/completion JSONL (data.format 'prompt_completion'): the loss counts completion tokens
only, packed and padded batches both train, a resume repeats the uninterrupted run bit for bit, bad records and
examples longer than train.seq_len are named or cut."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal

import pytest
import torch

from fasttrain.cli import main
from fasttrain.data import DataConfig
from fasttrain.data.examples import ExampleBatches, prepare_examples
from fasttrain.data.tokenizers import ByteTokenizer
from fasttrain.model import GPT, GPTConfig
from fasttrain.train import OptimConfig, RunConfig, TrainConfig, checkpoint, train
from fasttrain.train.build import load_for_inference
from fasttrain.train.step import forward_backward

pytestmark = pytest.mark.usefixtures("cpu_user")

TINY_MODEL = dict(n_layer=2, n_head=4, d_model=32, max_seq_len=48)
# Short prompts with answers a tiny byte-level model learns within tens of steps.
RECORDS = [{"q": f"{a}+{b}=", "a": f"{a + b}"} for a in range(5) for b in range(4)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("examples") / "sums.jsonl", RECORDS)


def run_config(tmp_path, jsonl, model=None, data=None, **train_kw):
    train_kw = {
        "steps": 30,
        "batch_size": 4,
        "seq_len": 32,
        "eval_interval": 10,
        "eval_batches": 2,
        "checkpoint_interval": 100,
        "log_interval": 5,
        "progress_bar": False,
        "sample_tokens": 0,
        "out_dir": str(tmp_path / "run"),
        **train_kw,
    }
    data = {
        "paths": [str(jsonl)],
        "format": "prompt_completion",
        "prompt_field": "q",
        "completion_field": "a",
        "val_fraction": 0.2,
        **(data or {}),
    }
    return RunConfig(
        model=GPTConfig(**{**TINY_MODEL, **(model or {})}),
        optim=OptimConfig(lr=1e-2, warmup_steps=3),
        train=TrainConfig(**train_kw),
        data=DataConfig(**data),
    )


@pytest.mark.parametrize("packing", [True, False])
def test_the_step_loss_is_the_mean_over_completion_tokens_alone(jsonl, packing):
    """One batch holding every example once: the step's loss equals a hand-computed mean, over the completion and
    end-of-text tokens of each example run alone, of -log p(next token)."""
    examples = prepare_examples(DataConfig(paths=[str(jsonl)], prompt_field="q", completion_field="a"))
    data = examples.train + examples.val
    rows = ExampleBatches(data, batch_size=1, seq_len=32, mode="pack" if packing else "pad").rows
    batch = ExampleBatches(data, len(rows), 32, mode="pack" if packing else "pad", pad_id=7, seed=3).next()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_MODEL, vocab_size=320))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    got = forward_backward(model, [batch], torch.device("cpu"), contextlib.nullcontext, scaler)

    tok, nll, count = ByteTokenizer(), torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for record in RECORDS:
            p, c = tok.encode(record["q"]), tok.encode(record["a"])
            ids = torch.tensor([p + c + [tok.eot_id]])
            logp = torch.log_softmax(model(ids[:, :-1])[0][0].double(), -1)  # (T, V)
            for t in range(len(p) - 1, ids.shape[1] - 1):  # predicting completion token t + 1 from ids[:t + 1]
                nll -= logp[t, ids[0, t + 1]]
                count += 1
    assert count == sum(len(r["a"]) + 1 for r in RECORDS)
    torch.testing.assert_close(got.double(), nll / count, rtol=1e-5, atol=0)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("packing", [True, False])
def test_packed_and_padded_examples_train_and_evaluate(tmp_path, jsonl, packing):
    result = train(run_config(tmp_path, jsonl, data={"packing": packing}))
    losses = result.metrics.train_loss
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses  # the overfit set is learned
    assert len(result.metrics.val_loss) == 3 and all(math.isfinite(v) for v in result.metrics.val_loss)
    summary = json.loads((result.run_dir / "data_summary.json").read_text())
    assert summary["examples"] == {"train": 15, "val": 5} and summary["cut"] == summary["dropped"] == 0
    assert checkpoint.load(result.run_dir)["batches"]["mode"] == ("pack" if packing else "pad")


def test_resume_after_sigterm_gives_the_identical_loss_curve(tmp_path, jsonl):
    # Dropout makes the curve depend on the RNG state, and 8 steps of 4 rows pass epochs of shuffled rows.
    kw = dict(model={"dropout": 0.1}, steps=8, eval_interval=4, log_interval=3)
    full = train(run_config(tmp_path / "full", jsonl, **kw)).metrics

    def sigterm_at_step_5(step, metrics):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = run_config(tmp_path / "split", jsonl, **kw)
    first = train(cfg, callbacks=[sigterm_at_step_5])
    assert first.stopped == "interrupted" and checkpoint.load(first.run_dir)["step"] == 5
    resumed = train(cfg, resume=True).metrics
    assert resumed.steps == full.steps == list(range(1, 9))
    assert resumed.train_loss == full.train_loss  # exact equality on CPU
    assert resumed.val_loss == full.val_loss and resumed.epochs == full.epochs


def test_examples_longer_than_seq_len_are_cut_or_dropped_and_counted(tmp_path, capsys):
    records = [
        {"q": "x" * 40, "a": "y"},  # the prompt fills seq_len 16: nothing to learn, dropped
        {"q": "ab", "a": "z" * 30},  # cut to 16 tokens: 15 of its completion tokens are learned
        *RECORDS[:6],
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    result = train(run_config(tmp_path, path, steps=4, seq_len=16, data={"val_fraction": 0.0}))
    out = capsys.readouterr().out
    assert "1 example(s) longer than train.seq_len 16 cut to it" in out
    assert "1 example(s) dropped: the prompt fills train.seq_len 16" in out
    assert json.loads((result.run_dir / "data_summary.json").read_text())["examples"]["train"] == 7
    assert all(math.isfinite(v) for v in result.metrics.train_loss)

    only_long = write_jsonl(tmp_path / "only_long.jsonl", records[:1])
    with pytest.raises(ValueError, match="the training split has no example with a completion token"):
        train(run_config(tmp_path / "b", only_long, seq_len=16, data={"val_fraction": 0.0}))


def _cli(capsys, tmp_path, path, *extra):
    args = ["train", "--data.paths", str(path), "--data.format", "prompt_completion", "--train.steps", "2"]
    args += ["--model.n_layer", "1", "--model.d_model", "32", "--model.n_head", "4", "--train.seq_len", "32"]
    args += ["--train.batch_size", "2", "--train.progress_bar", "false", "--train.sample_tokens", "0"]
    args += ["--optim.warmup_steps", "1", "--train.eval_batches", "1", "--data.cache_dir", str(tmp_path / "cache")]
    code = main([*args, "--train.out_dir", str(tmp_path / "run"), *extra])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_records_and_settings_end_with_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "only a prompt"}])
    code, lines = _cli(capsys, tmp_path, path)
    assert code == 2 and len(lines) == 1, lines
    assert f"{path}:2: needs string fields 'prompt' and 'completion'" in lines[0]

    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "a", "answer": "b"}] * 3)
    code, lines = _cli(capsys, tmp_path, good)  # the default field names are not this file's
    assert code == 2 and len(lines) == 1 and "needs string fields 'prompt' and 'completion'" in lines[0], lines
    cases = [
        (["--data.format", "chat"], "DataConfig.format must be one of ('text', 'prompt_completion'), got 'chat'"),
        (["--data.tokenizer", "bpe"], "data.tokenizer 'bpe' does not go with data.format 'prompt_completion'"),
        (["--data.prompt_field", ""], "DataConfig.prompt_field must be a non-empty string"),
    ]
    for extra, message in cases:
        code, lines = _cli(capsys, tmp_path, good, "--data.prompt_field", "question", *extra)
        assert code == 2 and len(lines) == 1 and message in lines[0], lines


def test_folders_are_searched_for_jsonl_files(tmp_path):
    folder = tmp_path / "data"
    (folder / "more").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", RECORDS[:3])
    write_jsonl(folder / "more" / "b.ndjson", RECORDS[3:5])
    (folder / "notes.txt").write_text("not read")
    examples = prepare_examples(DataConfig(paths=[str(folder)], prompt_field="q", completion_field="a"))
    assert examples.files == [folder / "a.jsonl", folder / "more" / "b.ndjson"]
    assert len(examples.train) + len(examples.val) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="data.paths holds no .jsonl or .ndjson file"):
        prepare_examples(DataConfig(paths=[str(tmp_path / "empty")]))
    with pytest.raises(ValueError, match="data.paths: .*missing.jsonl' does not exist"):
        prepare_examples(DataConfig(paths=[str(tmp_path / "missing.jsonl")]))


def test_a_resume_over_other_examples_is_refused(jsonl):
    examples = prepare_examples(DataConfig(paths=[str(jsonl)], prompt_field="q", completion_field="a"))
    batches = ExampleBatches(examples.train, 2, 32)
    batches.next()
    state = batches.state_dict()
    assert state["served"] == 2
    with pytest.raises(ValueError, match="saved over .* rows but these batches have"):
        ExampleBatches(examples.train[:3], 2, 32).load_state_dict(state)
    with pytest.raises(ValueError, match="ExampleBatches state has mode='pack' but these batches have 'pad'"):
        ExampleBatches(examples.train, 2, 32, mode="pad").load_state_dict(state)


def test_cuda_graph_refuses_prompt_completion_data(tmp_path, jsonl):
    with pytest.raises(ValueError, match="train.cuda_graph takes data.format 'text' only"):
        run_config(tmp_path, jsonl, cuda_graph=True, device="cuda")


def test_data_and_eval_commands_read_prompt_completion_runs(tmp_path, capsys, jsonl):
    code, lines = _cli(capsys, tmp_path, jsonl, "--data.prompt_field", "q", "--data.completion_field", "a")
    assert code == 0, lines
    code = main(["data", str(jsonl), "--data.format", "prompt_completion", "--data.prompt_field", "q"])
    out, err = capsys.readouterr()
    assert code == 2 and "needs string fields 'q' and 'completion'" in err  # the run's other field name is not given
    fields = ["--data.prompt_field", "q", "--data.completion_field", "a"]
    code = main(["data", str(jsonl), "--data.format", "prompt_completion", *fields])
    assert code == 0 and "prompt/completion examples: 16 train, 4 validation" in capsys.readouterr().out

    # eval: every example once (batch 1, padded rows in order); the loss is the completion tokens' mean NLL.
    code = main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(jsonl), "--batch-size", "1"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("loss ") and "completion tokens only" in out
    model, tok, _ = load_for_inference(str(tmp_path / "run"), "best", torch.device("cpu"))
    nll, count = 0.0, 0
    with torch.no_grad():
        for record in RECORDS:
            p, c = tok.encode(record["q"]), tok.encode(record["a"])
            ids = torch.tensor([p + c + [tok.eot_id]])
            logp = torch.log_softmax(model(ids[:, :-1])[0][0].double(), -1)  # (T, V)
            nll -= sum(logp[t, ids[0, t + 1]].item() for t in range(len(p) - 1, ids.shape[1] - 1))
            count += len(c) + 1
    assert abs(float(out.split()[1]) - nll / count) < 1e-4, (out, nll / count)
