"""Hugging Face checkpoint folders <-> fasttrain's GPT: logits equal transformers' per family (fp32, 1e-5 relative),
sharded folders, export round trips, and one clear error per bad folder. Checkpoints are tiny random models written
with save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402  (transformers brings safetensors)

from fasttrain.integrations.hf_checkpoint import (  # noqa: E402
    CheckpointError,
    config_from_hf,
    load_model,
    save_model,
)
from fasttrain.model import GPT  # noqa: E402

V = 97
LLAMA3 = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)
SHAPE = dict(
    hidden_size=32, intermediate_size=48, max_position_embeddings=64, vocab_size=V, bos_token_id=0, eos_token_id=1
)
CASES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=V, bos_token_id=0, eos_token_id=1
        )
    ),
    # GQA 4:2, Llama 3's rope scaling (original 16 < T, so long wavelengths are rescaled), untied head.
    "llama3": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=5e5,
            rope_scaling=LLAMA3,
            **SHAPE,
        )
    ),
    # head_dim given apart from hidden_size / heads (16 != 32 / 4), tied head, biases on every projection.
    "llama_tied_bias": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
            **SHAPE,
        )
    ),
    # MQA, a window of 5 keys over sequences of 23.
    "mistral": lambda: transformers.MistralForCausalLM(
        transformers.MistralConfig(
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, sliding_window=5, **SHAPE
        )
    ),
    # q/k/v biases without an o_proj bias; layer 0 attends fully, layers 1-2 through a window of 4.
    "qwen2": lambda: transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
            **SHAPE,
        )
    ),
}


@pytest.fixture(autouse=True)
def _on_cpu_kernels(cpu_user):
    """The C++ CPU kernels and the references, as a CPU user runs (the interpreted Triton kernels have their own
    tests)."""


def _close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> float:
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err <= rel, f"max |fasttrain - transformers| / max |transformers| = {err:.2e} > {rel}"
    return err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model in eval mode, its save_pretrained folder), random weights and biases at std 0.3
    so every term of the logits matters."""
    torch.manual_seed(0)
    out = {}
    for name, make in CASES.items():
        model = make().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.3)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = model, folder
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(checkpoints, name):
    hf_model, folder = checkpoints[name]
    model, hf_config = load_model(folder)
    assert hf_config["model_type"] == hf_model.config.model_type
    model.eval()
    for B, T in ((2, 23), (1, 1)):
        idx = torch.randint(0, V, (B, T))
        with torch.no_grad():
            _close(model(idx)[0], hf_model(idx).logits)


def test_families_map_their_options(checkpoints):
    cfg = {
        name: config_from_hf(json.loads((folder / "config.json").read_text()))
        for name, (_, folder) in checkpoints.items()
    }
    assert (cfg["gpt2"].positions, cfg["gpt2"].bias, cfg["gpt2"].tie_embeddings) == ("learned", True, True)
    assert (cfg["llama3"].rope_scaling, cfg["llama3"].rope_theta, cfg["llama3"].n_kv_head) == ("llama3", 5e5, 2)
    assert (cfg["llama_tied_bias"].head_dim, cfg["llama_tied_bias"].bias) == (16, True)
    assert (cfg["mistral"].sliding_window, cfg["mistral"].full_attention_layers) == (5, 0)
    q = cfg["qwen2"]
    assert (q.qkv_bias, q.bias, q.sliding_window, q.full_attention_layers) == (True, False, 4, 1)


def test_sharded_checkpoint(checkpoints, tmp_path):
    hf_model, _ = checkpoints["llama3"]
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
    model, _ = load_model(tmp_path)
    idx = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        _close(model.eval()(idx)[0], hf_model(idx).logits)


@pytest.mark.parametrize("name", ["gpt2", "llama3", "qwen2"])
def test_export_round_trip(checkpoints, tmp_path, name):
    """import -> a few training steps -> export -> transformers loads it -> the same logits as fasttrain."""
    _, folder = checkpoints[name]
    model, hf_config = load_model(folder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, V, (2, 12))
    for _ in range(2):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = save_model(model, tmp_path / "export", base_config=hf_config)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    model.eval()
    with torch.no_grad():
        ours = model(idx)[0]
        _close(ours, reloaded(idx).logits)
        trained = (ours - checkpoints[name][0](idx).logits).abs().max()
    assert trained > 1e-3  # the export holds the trained weights, not the checkpoint's


def test_export_refuses_non_empty_folder(checkpoints, tmp_path):
    model, _ = load_model(checkpoints["gpt2"][1])
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        save_model(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    save_model(model, target, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it


def _copy(folder, dest, config=None, tensors=None):
    dest.mkdir()
    hf = json.loads((folder / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps(config(hf) if config else hf))
    state = load_file(folder / "model.safetensors")
    save_file(tensors(state) if tensors else state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_bad_folders(checkpoints, tmp_path):
    folder = checkpoints["llama3"][1]
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path / "empty")
    bert = _copy(
        folder, tmp_path / "bert", config=lambda c: {**c, "model_type": "bert", "architectures": ["BertModel"]}
    )
    with pytest.raises(
        CheckpointError,
        match=r"unsupported architecture: model_type 'bert' \(architectures: BertModel\); supported: gpt2",
    ):
        load_model(bert)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(no_weights)
    missing = _copy(
        folder, tmp_path / "missing", tensors=lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up" not in k}
    )
    with pytest.raises(CheckpointError, match="no tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(missing)
    extra = _copy(folder, tmp_path / "extra", tensors=lambda s: {**s, "model.layers.9.x.weight": torch.ones(2)})
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.x.weight'"):
        load_model(extra)
    wide = _copy(folder, tmp_path / "wide", config=lambda c: {**c, "intermediate_size": 64})
    with pytest.raises(
        CheckpointError, match=r"blocks.0.mlp.up.weight has shape \(96, 32\), the config gives \(128, 32\)"
    ):
        load_model(wide)
    gelu = _copy(folder, tmp_path / "gelu", config=lambda c: {**c, "hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="hidden_act 'gelu' is not supported"):
        load_model(gelu)


def test_loaded_model_trains_with_gradients(checkpoints):
    """The imported model is an ordinary GPT: every parameter gets a finite, non-zero gradient."""
    model, _ = load_model(checkpoints["qwen2"][1])
    assert isinstance(model, GPT) and model.lm_head.weight is not model.wte.weight
    idx = torch.randint(0, V, (1, 97 % 64))
    model(idx[:, :-1], idx[:, 1:])[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "name, targets",
    [("gpt2", None), ("llama3", ["all-linear"]), ("qwen2", ["q_proj", "v_proj", "gate_proj", "down_proj"])],
)
def test_lora_adapters_load_in_peft_with_the_same_logits(checkpoints, tmp_path, name, targets):
    peft = pytest.importorskip("peft")
    from fasttrain.finetune import apply_lora, merge_lora, save_adapter

    hf_model, folder = checkpoints[name]
    model, _ = load_model(folder)
    spec = apply_lora(model, rank=4, alpha=8.0, targets=targets)
    with torch.no_grad():  # PEFT starts B at zero; random B makes every adapter count
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.3)
    model.eval()
    save_adapter(model, spec, tmp_path / "adapter")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    idx = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        ours = model(idx)[0]
        _close(ours, peft_model(idx).logits)
        assert (ours - hf_model(idx).logits).abs().max() > 1e-2  # the adapters change the model
        _close(merge_lora(model)(idx)[0], ours)
