"""The GPT model: every architecture option, parameter/FLOP counts, init schemes, rotary, the cache hand-off."""

import math

import pytest
import torch
import torch.nn.functional as F

from fasttrain.model import GPT, GPTConfig, flops_per_token, param_count
from fasttrain.model.rotary import rotary_tables
from fasttrain.ops import apply_rotary_emb as apply_rotary

SMALL = dict(n_layer=2, n_head=4, d_model=32, vocab_size=61, max_seq_len=40)

VARIANTS = [
    dict(),
    dict(norm="rmsnorm", activation="swiglu", n_kv_head=1),
    dict(positions="learned", tie_embeddings=False, bias=True, n_kv_head=2, activation="swiglu"),
    dict(positions="learned", norm="rmsnorm", bias=True, dropout=0.1, init="xavier"),
    dict(init="he", d_ff=48),
    # The HF families' options: head_dim apart from d_model / n_head, q/k/v biases alone, a window on the last
    # block, llama3 rope scaling, a norm epsilon.
    dict(
        norm="rmsnorm",
        activation="swiglu",
        n_kv_head=2,
        head_dim=16,
        qkv_bias=True,
        sliding_window=7,
        full_attention_layers=1,
        rope_scaling="llama3",
        rope_original_max_seq_len=16,
        norm_eps=1e-5,
    ),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_forward_backward_and_param_count(variant):
    torch.manual_seed(0)
    cfg = GPTConfig(**SMALL, **variant)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, 37))
    logits, loss = model(idx, torch.roll(idx, -1, 1), return_logits=True)
    assert logits.shape == (3, 37, cfg.vocab_size)
    # A fresh model predicts close to uniformly: loss near ln(V).
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert model.num_params() == param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=True) == param_count(cfg, non_embedding=True)
    assert (model.lm_head.weight is model.wte.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("variant", VARIANTS[:3], ids=["default", "rmsnorm-swiglu-mqa", "learned-bias"])
def test_fused_residual_adds_compute_the_textbook_pre_norm_blocks(variant):
    # GPT carries the stream beside each branch so the adds land in the norms (add_layer_norm); the model must still
    # compute x = x + attn(norm1(x)); x = x + mlp(norm2(x)); logits = lm_head(norm_f(x)), to fp32 summation order.
    torch.manual_seed(0)
    cfg = GPTConfig(**SMALL, **variant)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 23))
    logits, _ = model(idx)

    def textbook():
        x = model.wte(idx)
        if model.wpe is not None:
            x = x + model.wpe(torch.arange(23))
        cos, sin = (model.rope_cos[:23], model.rope_sin[:23]) if model.rope_cos is not None else (None, None)
        for block in model.blocks:
            x = x + block.attn(block.norm1(x), cos, sin)
            x = x + block.mlp(block.norm2(x))
        return model.lm_head(model.norm_f(x))

    want = textbook()
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    upstream = torch.randn_like(want)
    params = list(model.parameters())
    for got, ref in zip(torch.autograd.grad(logits, params, upstream), torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 61, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 61, (2, 8))
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-5)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


def test_dropout_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, dropout=0.2))
    idx = torch.randint(0, 61, (2, 16))
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_attention_dropout_runs_the_cpu_kernel(cpu_user, monkeypatch):
    """A config with dropout trains through the attention kernels: auto takes the C++ kernel, not the reference."""
    from fasttrain.ops import attention as attention_ops

    def refused(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(attention_ops.Reference, "forward", staticmethod(refused))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, dropout=0.2))
    idx = torch.randint(0, 61, (2, 16))
    model(idx)[0].float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def _std(model, attr):
    return getattr(model.blocks[0], attr[0]).__getattr__(attr[1]).weight.std().item()


def test_init_schemes_draw_the_documented_scales():
    torch.manual_seed(0)
    big = dict(n_layer=8, n_head=4, d_model=256, vocab_size=300, max_seq_len=16)
    gpt2 = GPT(GPTConfig(**big, init="gpt2"))
    assert _std(gpt2, ("attn", "qkv")) == pytest.approx(0.02, rel=0.05)
    assert _std(gpt2, ("attn", "proj")) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert _std(gpt2, ("mlp", "down")) == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    xavier = GPT(GPTConfig(**big, init="xavier"))  # up: 256 -> 1024
    assert _std(xavier, ("mlp", "up")) == pytest.approx(math.sqrt(2 / (256 + 1024)), rel=0.05)
    he = GPT(GPTConfig(**big, init="he"))  # down: fan-in 1024
    assert _std(he, ("mlp", "down")) == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    for model in (gpt2, xavier, he):
        assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert torch.equal(model.blocks[0].norm1.weight, torch.ones(256))


def test_flops_per_token_closed_form():
    # GPT-2 small: 6 FLOPs per matmul weight per token for training, attention 6 * L * T * d (causal half of 12).
    L, d, V, T = 12, 768, 50304, 1024
    cfg = GPTConfig(n_layer=L, n_head=12, d_model=d, vocab_size=V, max_seq_len=T)
    assert flops_per_token(cfg, T) == 6 * (L * 12 * d * d + d * V) + 6 * L * T * d
    assert flops_per_token(cfg, T, training=False) == flops_per_token(cfg, T) / 3
    # Blocks (12 d^2 of matrices, two bias-free LayerNorms), final norm, tied embeddings; rotary has no table.
    assert param_count(cfg) == L * (12 * d * d + 2 * d) + d + V * d == 123_587_328


def test_rotary_is_a_rotation_that_encodes_relative_position():
    torch.manual_seed(0)
    cos, sin = rotary_tables(64, 16)
    assert cos.shape == sin.shape == (64, 8)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def rq(t):
        return apply_rotary(q, cos[t : t + 1], sin[t : t + 1])

    def rk(t):
        return apply_rotary(k, cos[t : t + 1], sin[t : t + 1])

    torch.testing.assert_close(rq(5).norm(), q.norm())
    # <R(m) q, R(n) k> depends only on m - n.
    torch.testing.assert_close((rq(9) * rk(4)).sum(), (rq(30) * rk(25)).sum(), rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 6, 3, 16)
    per_sequence = apply_rotary(x, cos[:6].expand(2, 6, 8), sin[:6].expand(2, 6, 8))  # (B, T, D/2) tables
    torch.testing.assert_close(per_sequence, apply_rotary(x, cos[:6], sin[:6]))
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        apply_rotary(x, cos[:6], sin[:6, :4])


class ConcatCache:
    """The smallest object meeting the model's cache contract: k/v grown by concatenation, plain causal attention."""

    def __init__(self, lengths):
        self.lengths = torch.tensor(lengths)
        self.k, self.v = {}, {}

    def positions(self, T):
        return self.lengths[:, None] + torch.arange(T)  # (B, T)

    def attend(self, layer, q, k, v):
        self.k[layer] = torch.cat([self.k[layer], k], 1) if layer in self.k else k
        self.v[layer] = torch.cat([self.v[layer], v], 1) if layer in self.v else v
        K, V = self.k[layer], self.v[layer]  # (B, S, Hkv, D)
        rep = q.shape[2] // K.shape[2]
        K, V = K.repeat_interleave(rep, 2), V.repeat_interleave(rep, 2)  # (B, S, H, D)
        T, S = q.shape[1], K.shape[1]
        mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # query t sees keys up to S - T + t
        out = F.scaled_dot_product_attention(q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)  # (B, T, H, D)


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_cache_hand_off_reproduces_the_full_forward(positions):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, n_kv_head=2, positions=positions)).eval()
    idx = torch.randint(0, 61, (2, 12))
    full, _ = model(idx)
    cache = ConcatCache([0, 0])
    prefill, _ = model(idx[:, :7], cache=cache)
    cache.lengths += 7
    steps = []
    for t in range(7, 12):
        logits, _ = model(idx[:, t : t + 1], cache=cache)
        cache.lengths += 1
        steps.append(logits)
    torch.testing.assert_close(torch.cat([prefill] + steps, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_head=4, n_kv_head=3), "n_kv_head"),
        (dict(n_head=5), "n_head"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(positions="alibi"), "positions must be one of"),
        (dict(init="orthogonal"), "init must be one of"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_head=2, d_model=6), "even head_dim"),
        (dict(head_dim=0), "head_dim must be a positive int"),
        (dict(norm_eps=0.0), "norm_eps must be > 0"),
        (dict(rope_scaling="yarn"), "rope_scaling must be one of"),
        (dict(rope_scaling="llama3", positions="learned"), "needs positions 'rotary'"),
        (dict(rope_scaling="llama3", rope_low_freq_factor=4.0), "rope_low_freq_factor < rope_high_freq_factor"),
        (dict(sliding_window=0), "sliding_window must be a positive int"),
        (dict(full_attention_layers=-1), "full_attention_layers must be >= 0"),
    ],
)
def test_bad_config_raises_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **kwargs})


def test_bad_model_inputs_raise():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="exceeds max_seq_len 40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="idx must be"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="vocab_size must be set"):
        GPT(GPTConfig(n_layer=1, n_head=1, d_model=8))
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(SMALL))


def test_casting_the_model_keeps_the_rotary_tables_fp32():
    # Module.to(dtype) would otherwise round cos/sin to bf16 (off by up to ~4e-3), shifting every rotated q and k.
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg).to(torch.bfloat16)
    cos, sin = rotary_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
    assert model.wte.weight.dtype == torch.bfloat16
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert torch.equal(model.half().float().rope_cos, cos)


@pytest.mark.parametrize("load", ["to_empty+reset", "to_empty", "assign"])
def test_a_model_built_on_the_meta_device_works(load):
    # How FSDP2 and big-model loading build it: no memory until the weights arrive. The rope tables are not in the
    # state dict, and assign=True hands each tensor over as its own Parameter.
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**SMALL))
    with torch.device("meta"):
        model = GPT(GPTConfig(**SMALL))
    if load == "assign":
        model.load_state_dict(ref.state_dict(), assign=True)
    else:
        model.to_empty(device="cpu")
        if load == "to_empty+reset":
            model.reset_parameters()
        model.load_state_dict(ref.state_dict())
    assert model.lm_head.weight is model.wte.weight and len(list(model.parameters())) == len(list(ref.parameters()))
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)
    idx = torch.randint(0, SMALL["vocab_size"], (2, 9))
    assert torch.equal(model(idx)[0], ref(idx)[0])


def test_a_head_untied_by_the_user_stays_untied_through_a_load():
    model = GPT(GPTConfig(**SMALL))
    model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone())  # fine-tune the head alone
    state = {k: v + 1 if k == "lm_head.weight" else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    assert model.lm_head.weight is not model.wte.weight and torch.equal(model.lm_head.weight, state["lm_head.weight"])


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[2]], ids=["tied", "untied"])
@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreted", "cpu"])
def test_fused_loss_matches_the_loss_on_logits(variant, interpret, monkeypatch):
    """With targets the lm_head and the loss run fused (no logits returned); return_logits=True takes the loss from
    the logits: the same loss and gradients, ignored targets included."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL, **variant))
    idx = torch.randint(0, SMALL["vocab_size"], (2, 37))
    targets = torch.roll(idx, -1, 1)
    targets[:, -5:] = -100
    params = list(model.parameters())
    logits, loss = model(idx, targets, return_logits=True)
    none, fused = model(idx, targets)
    assert none is None and logits.shape == (2, 37, SMALL["vocab_size"])
    torch.testing.assert_close(fused, loss, rtol=1e-6, atol=0)
    for got, want in zip(torch.autograd.grad(fused, params), torch.autograd.grad(loss, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("interpret", ["1", "0"], ids=["triton-interpreted", "cpu-kernels"])
def test_compiles_with_fullgraph_and_matches_eager(interpret, monkeypatch):
    # aot_eager traces forward and backward through every op's fake implementation (the fused add + norm's
    # included, with the last stream's gradient absent), as inductor does on a GPU in bench_step's compiled rows.
    # Without the interpreter each op's choice passes over a backend that is not live, as on a GPU (the CPU kernels
    # there): under torch 2.11, the GPU machine's, the code of acda720 failed here (9 breaks in the forward alone,
    # by torch._dynamo.explain: a reason built per call, benchmarks/NOTES.md), which torch 2.13 traced through.
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=64, vocab_size=96, max_seq_len=64, bias=True))
    idx, targets = torch.randint(0, 96, (1, 64)), torch.randint(0, 96, (1, 64))
    params = list(model.parameters())
    _, loss = model(idx, targets)
    _, compiled_loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets)
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=1e-6)
    for got, want in zip(torch.autograd.grad(compiled_loss, params), torch.autograd.grad(loss, params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
