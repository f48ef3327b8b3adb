"""Fine-tuning from the command line: `fasttrain train --init.from DIR` on a tiny Llama-shaped checkpoint with its
own tokenizer.json, then `fasttrain export` back to a folder transformers loads with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fasttrain.cli import main  # noqa: E402
from fasttrain.data.tokenizers import load_tokenizer_file, train_bpe  # noqa: E402
from fasttrain.integrations.hf_checkpoint import load_model  # noqa: E402
from fasttrain.train.build import load_for_inference  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_user")

TEXT = [f"def f_{i}(x):\n    return x * {i % 7} + {i % 3}\n" for i in range(60)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(checkpoint folder of a tiny random Llama with a BPE tokenizer.json of its own, corpus folder)."""
    root = tmp_path_factory.mktemp("finetune")
    tok = train_bpe(iter(TEXT), 300)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_size=32,
        intermediate_size=64,
        max_position_embeddings=64,
        vocab_size=tok.vocab_size,
        bos_token_id=tok.eot_id,
        eos_token_id=tok.eot_id,
    )
    ckpt = root / "ckpt"
    transformers.LlamaForCausalLM(config).save_pretrained(ckpt)
    tok.save(ckpt / "tokenizer.json")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text("\n".join(TEXT[i * 15 : (i + 1) * 15]))
    return ckpt, corpus


def train_args(tmp_path, ckpt, corpus, *extra):
    return [
        "train",
        "--preset",
        "tiny",
        "--init.from",
        str(ckpt),
        "--data.paths",
        str(corpus),
        "--data.num_workers",
        "0",
        "--data.val_fraction",
        "0.25",
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--train.out_dir",
        str(tmp_path / "run"),
        "--train.seq_len",
        "32",
        "--train.batch_size",
        "2",
        "--train.steps",
        "3",
        "--optim.warmup_steps",
        "1",
        "--train.eval_interval",
        "3",
        "--train.eval_batches",
        "1",
        "--train.progress_bar",
        "false",
        "--train.sample_tokens",
        "0",
        *extra,
    ]


def run_cli(capsys, args):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_from_checkpoint_then_export_round_trip(tmp_path, source, capsys):
    ckpt, corpus = source
    # lr 1e-9: after training, the run's weights are the checkpoint's to ~1e-8, which shows they were loaded.
    code, out, err = run_cli(capsys, train_args(tmp_path, ckpt, corpus, "--optim.lr", "1e-9"))
    assert code == 0, err
    run = tmp_path / "run"
    saved = json.loads((run / "config.json").read_text())
    assert saved["init"]["from"] == str(ckpt) and saved["data"]["tokenizer"] == str(ckpt / "tokenizer.json")
    assert saved["model"]["n_kv_head"] == 2 and saved["model"]["norm"] == "rmsnorm"
    assert json.loads((run / "hf_config.json").read_text())["model_type"] == "llama"
    model, tokenizer, _ = load_for_inference(run, "latest")
    original, _ = load_model(ckpt)
    for (name, got), want in zip(model.state_dict().items(), original.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    theirs = load_tokenizer_file(ckpt / "tokenizer.json")
    assert tokenizer.encode(TEXT[5]) == theirs.encode(TEXT[5]) and tokenizer.eot_id == theirs.eot_id

    code, out, err = run_cli(
        capsys, ["export", "--checkpoint", str(run), "--to", str(tmp_path / "hf"), "--which", "latest"]
    )
    assert code == 0, err
    exported = tmp_path / "hf"
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    hf = json.loads((exported / "config.json").read_text())
    assert (hf["model_type"], hf["eos_token_id"]) == ("llama", tokenizer.eot_id)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    fast_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(exported / "tokenizer.json"))
    idx = torch.tensor([fast_tok("def f_3(x):\n    return x")["input_ids"]])
    assert idx.shape[1] > 3 and idx.max() < 300
    with torch.no_grad():
        want = model(idx)[0]
        err = ((reloaded(idx).logits - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-5, err

    # An existing export is never overwritten without --force; nothing is changed by the refusal.
    before = (exported / "model.safetensors").read_bytes()
    code, out, err = run_cli(capsys, ["export", "--checkpoint", str(run), "--to", str(exported)])
    assert code == 2 and "is not empty (pass --force to replace it)" in err
    assert (exported / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.n_layer", "3"], "model.n_layer 3 conflicts with init.from"),
        (["--model.norm", "layernorm"], "model.norm 'layernorm' conflicts with init.from"),
        (["--data.tokenizer", "byte"], "data.tokenizer 'byte' conflicts with init.from"),
        (["--train.seq_len", "128"], "train.seq_len (128) exceeds model.max_seq_len (64)"),
    ],
)
def test_conflicting_options_end_with_one_line(tmp_path, source, capsys, extra, message):
    ckpt, corpus = source
    code, out, err = run_cli(capsys, train_args(tmp_path, ckpt, corpus, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_checkpoint_folders_end_with_one_line(tmp_path, source, capsys):
    ckpt, corpus = source
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tok / name).write_bytes((ckpt / name).read_bytes())
    cases = [
        (tmp_path / "nothing", "is not a folder"),
        (corpus, "is not a Hugging Face checkpoint (no config.json)"),
        (no_tok, "has no tokenizer.json"),
    ]
    for folder, message in cases:
        code, out, err = run_cli(capsys, train_args(tmp_path, folder, corpus))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli(capsys, ["export", "--checkpoint", str(tmp_path / "norun"), "--to", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x").exists()


def _logits_close(got, want, rel=1e-5):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= rel, err


def test_lora_run_exports_merged_and_as_peft_adapters(tmp_path, source, capsys):
    peft = pytest.importorskip("peft")
    ckpt, corpus = source
    lora = ["--finetune.lora_rank", "4", "--finetune.lora_targets", "q_proj,v_proj,down_proj", "--optim.lr", "3e-2"]
    code, out, err = run_cli(capsys, train_args(tmp_path, ckpt, corpus, *lora))
    assert code == 0, err
    assert "finetune: 1,664 of " in out  # 2 layers x 4 x (q: 32 + 32, v: 32 + 16, down: 64 + 32)
    run = tmp_path / "run"
    model, _, _ = load_for_inference(run, "latest")
    original, _ = load_model(ckpt)
    trained = dict(model.state_dict())
    for name, want in original.state_dict().items():
        assert torch.equal(trained[name], want), name  # the base weights stayed frozen
    idx = torch.randint(0, 300, (1, 17))
    with torch.no_grad():
        ours = model(idx)[0]
        assert (ours - original(idx)[0]).abs().max() > 1e-4  # the adapters trained

    # A LoRA run resumes with its adapters (the checkpoint folder is not read again).
    code, out, err = run_cli(capsys, ["train", "--resume", str(run), "--train.steps", "4"])
    assert code == 0, err
    resumed, _, _ = load_for_inference(run, "latest")
    with torch.no_grad():
        assert (resumed(idx)[0] - ours).abs().max() > 0  # one more step taken on the adapters
    model = resumed
    with torch.no_grad():
        ours = model(idx)[0]

    latest = ["--which", "latest"]
    assert main(["export", "--checkpoint", str(run), "--to", str(tmp_path / "merged"), *latest]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (
        main(["export", "--checkpoint", str(run), "--to", str(tmp_path / "adapter"), "--adapters-only", *latest]) == 0
    )
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        _logits_close(merged(idx).logits, ours)
        _logits_close(adapted(idx).logits, ours)


def test_frozen_parameters_keep_their_values_and_get_no_optimizer_state(tmp_path, source, capsys):
    from fasttrain.train import checkpoint

    ckpt, corpus = source
    freeze = ["--finetune.freeze", "embeddings,blocks:1", "--optim.lr", "3e-2"]
    code, out, err = run_cli(capsys, train_args(tmp_path, ckpt, corpus, *freeze))
    assert code == 0, err
    state = checkpoint.load(tmp_path / "run", "latest")
    original, _ = load_model(ckpt)
    trainable = 0
    for name, want in original.state_dict().items():
        frozen = name.startswith(("wte.", "blocks.0."))
        assert torch.equal(state["model"][name], want) == frozen, name
        trainable += 0 if frozen else 1
    assert len(state["optimizer"]["state"]) == trainable  # AdamW state for the trainable tensors alone


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--finetune.lora_rank", "2", "--finetune.lora_targets", "c_attn"], "lora_targets ['c_attn'] match no module"),
        (["--finetune.freeze", "*.nothing"], "finetune.freeze '*.nothing' matches no parameter"),
        (["--finetune.lora_dropout", "1.5"], "lora_dropout must be in [0, 1)"),
    ],
)
def test_bad_finetune_options_end_with_one_line(tmp_path, source, capsys, extra, message):
    ckpt, corpus = source
    code, out, err = run_cli(capsys, train_args(tmp_path, ckpt, corpus, *extra))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_adapters_only_needs_a_lora_run(tmp_path, source, capsys):
    ckpt, corpus = source
    assert run_cli(capsys, train_args(tmp_path, ckpt, corpus))[0] == 0
    code, out, err = run_cli(
        capsys, ["export", "--checkpoint", str(tmp_path / "run"), "--to", str(tmp_path / "a"), "--adapters-only"]
    )
    assert code == 2 and "--adapters-only needs a LoRA run" in err and not (tmp_path / "a").exists()
