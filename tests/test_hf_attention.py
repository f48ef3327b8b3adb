"""attn_implementation="fasttrain" on the kernels: tiny random Llama (GQA 4/2), Mistral (sliding window 5 < T),
Qwen2 (one full and one sliding layer), Gemma 2 (attention-logit softcapping; a sliding and a full layer) and GPT-2,
fp32, against transformers' eager attention, for padded (left and
right), packed (position_ids restarting) and unpadded batches, greedy generation with dynamic and static caches
(batch 2, left padding), and torch.compile(fullgraph=True). FASTTRAIN_BACKEND=cpu or =triton makes any fallback to
the reference an error, so a passing case ran the kernels."""

import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import sdpa_mask

from fasttrain.integrations import hf_attention
from fasttrain.integrations.hf import fasttrain_attention_forward, fasttrain_mask  # importing registers "fasttrain"
from fasttrain.integrations.hf_attention import left_padding, packed_offsets, padding_offsets, padding_offsets_read
from fasttrain.ops import flash_attn_func

from helpers import set_attn_implementation

TOL = 2e-5  # fp32 logits and gradients of a 2-layer model: measured <= 4e-7 against eager
T = 13
SMALL = dict(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
LLAMA_LIKE = dict(SMALL, num_key_value_heads=2, max_position_embeddings=64)
CAP = 0.05  # Gemma 2's attention softcap here: leaving it out moves the logits by far more than TOL


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(**LLAMA_LIKE))
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(**LLAMA_LIKE, sliding_window=5))
    if name == "qwen2":  # layer_types: full, then sliding
        cfg = Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=5, max_window_layers=1)
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
        return Qwen2ForCausalLM(cfg)
    if name == "gemma2":  # a cap low enough for these tiny scores to reach it (Gemma 2's own is 50)
        cfg = Gemma2Config(**LLAMA_LIKE, head_dim=32, sliding_window=5, attn_logit_softcapping=CAP)
        assert cfg.layer_types == ["sliding_attention", "full_attention"]
        return Gemma2ForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=100, n_embd=128, n_layer=2, n_head=4, n_positions=64, eos_token_id=0, bos_token_id=0)
    return GPT2LMHeadModel(cfg)


MODELS = ("llama", "mistral", "qwen2", "gemma2", "gpt2")


@pytest.fixture(scope="module")
def models():
    return {name: _build(name) for name in MODELS}


def _inputs(case: str) -> dict:
    ids = torch.randint(0, 100, (2, T), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(2, T, dtype=torch.long)
    if case == "left":
        mask[1, :4] = 0
    elif case == "right":
        mask[0, 9:] = 0
    elif case == "packed":  # three sequences in one row, as DataCollatorWithFlattening gives them
        pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4]])
        return dict(input_ids=ids[:1], position_ids=pos, use_cache=False)
    if case == "none":
        return dict(input_ids=ids, use_cache=False)
    return dict(input_ids=ids, attention_mask=mask, use_cache=False)


def _real(inputs) -> torch.Tensor:
    """The rows of real tokens: eager's padded rows are garbage (finite), the kernels' differ."""
    return inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()


def _run(model, impl, inputs, compile_backend=None):
    """Logits and every parameter's gradient of a random weighting of the real tokens' logits."""
    set_attn_implementation(model, impl)
    model.train()
    model.zero_grad(set_to_none=True)
    call = model if compile_backend is None else torch.compile(model, backend=compile_backend, fullgraph=True)
    logits = call(**inputs).logits
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * weights)[_real(inputs)].sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_matches_eager(model, inputs, logits, grads):
    want_logits, want_grads = _run(model, "eager", inputs)
    real = _real(inputs)
    assert (logits - want_logits)[real].abs().max() < TOL
    for name, g in want_grads.items():
        assert (grads[name] - g).abs().max() < TOL * max(1.0, g.abs().max().item()), name


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


@pytest.mark.parametrize("case", ["left", "right", "packed"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_and_gradients_match_eager_on_the_cpu_kernel(models, name, case, monkeypatch):
    model = models[name]
    _no_dropout(model)  # GPT-2's dropout draws differ between implementations; its passing through is tested below
    inputs = _inputs(case)
    with monkeypatch.context() as m:
        m.setenv("FASTTRAIN_BACKEND", "cpu")
        logits, grads = _run(model, "fasttrain", inputs)
    _assert_matches_eager(model, inputs, logits, grads)


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("llama", "left"),
        pytest.param("mistral", "packed", marks=pytest.mark.slow),
        pytest.param("qwen2", "right", marks=pytest.mark.slow),
        pytest.param("gemma2", "left", marks=pytest.mark.slow),
    ],
)
def test_logits_and_gradients_match_eager_on_the_triton_kernels(models, name, case, monkeypatch):
    model = models[name]
    inputs = _inputs(case)
    with monkeypatch.context() as m:
        m.setenv("FASTTRAIN_BACKEND", "triton")  # interpreted here
        logits, grads = _run(model, "fasttrain", inputs)
    _assert_matches_eager(model, inputs, logits, grads)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_eager(models, name, cache, backend, monkeypatch):
    # Batch 2, the first prompt left-padded; Mistral's window (5) is shorter than prompt + new tokens (13).
    model = models[name].eval()
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation=cache)
    outs = {}
    for impl in ("fasttrain", "eager"):
        set_attn_implementation(model, impl)
        with monkeypatch.context() as m:
            if impl == "fasttrain":
                m.setenv("FASTTRAIN_BACKEND", backend)
            outs[impl] = model.generate(ids, **kw, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(outs["fasttrain"].sequences, outs["eager"].sequences)
    for got, want in zip(outs["fasttrain"].logits, outs["eager"].logits, strict=True):  # every step's logits
        assert (got - want).abs().max() < TOL


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cached_forward_without_a_mask_matches_eager(models, cache, monkeypatch):
    # A static cache's keys run to its full length, unwritten past the tokens seen: the mask function then hands the
    # attention function the written length, which transformers' flash-attention path leaves to a mask.
    from transformers import DynamicCache, StaticCache

    model = models["llama"].eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(4))
    logits = {}
    for impl in ("fasttrain", "eager"):
        set_attn_implementation(model, impl)
        kv = DynamicCache(config=model.config) if cache == "dynamic" else StaticCache(model.config, max_cache_len=20)
        with monkeypatch.context() as m, torch.no_grad():
            if impl == "fasttrain":
                m.setenv("FASTTRAIN_BACKEND", "cpu")
            logits[impl] = [model(ids[:, a:b], cache=kv).logits for a, b in ((0, 6), (6, 7), (7, 9))]
    for got, want in zip(logits["fasttrain"], logits["eager"], strict=True):  # prefill, one token, two tokens
        assert (got - want).abs().max() < TOL


def _attention_ops(graphs) -> int:
    """fasttrain attention calls in the traced graphs, torch.cond's branches included."""
    return sum(
        "fasttrain.attention_forward" in str(node.target)
        for gm in graphs
        for sub in gm.modules()
        if isinstance(sub, torch.fx.GraphModule)
        for node in sub.graph.nodes
        if node.op == "call_function"
    )


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("llama", "none"),
        ("llama", "ones"),
        pytest.param("llama", "left", marks=pytest.mark.slow),
        pytest.param("mistral", "ones", marks=pytest.mark.slow),
        pytest.param("llama", "cu_seq_lens", marks=pytest.mark.slow),
        pytest.param("qwen2", "none", marks=pytest.mark.slow),
        pytest.param("gpt2", "left", marks=pytest.mark.slow),
        pytest.param("gpt2", "none", marks=pytest.mark.slow),
    ],
)
def test_compiles_to_one_graph_holding_the_kernels(models, name, case, monkeypatch):
    # Unpadded training as the HF Trainer runs it (an all-ones mask) and without a mask; the mask's values are unknown
    # while tracing, so both reach the kernels through device-side offsets, and no warning may be traced.
    model = models[name]
    _no_dropout(model)
    inputs = _inputs({"left": "left", "cu_seq_lens": "packed"}.get(case, "none"))
    if case == "ones":
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if case == "cu_seq_lens":  # packed sequences as a flattening collator passes them (eager reads position_ids)
        cu = torch.tensor([0, 5, 8, 13], dtype=torch.int32)
        inputs |= dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(keep)
    with monkeypatch.context() as m, warnings.catch_warnings():
        m.setenv("FASTTRAIN_BACKEND", "cpu")
        warnings.simplefilter("error")  # fullgraph=True also fails on any warning traced
        logits, grads = _run(model, "fasttrain", inputs, compile_backend=counter)
    assert counter.frame_count == 1
    assert _attention_ops(graphs) >= model.config.num_hidden_layers
    _assert_matches_eager(model, inputs, logits, grads)


@pytest.mark.parametrize("given", ["position_ids, batch 2", "cu_seq_lens"])
def test_packed_sequences_match_eager(models, given, monkeypatch):
    model = models["llama"]
    inputs = _inputs("packed")
    if given == "cu_seq_lens":  # DataCollatorWithFlattening(return_flash_attn_kwargs=True); eager reads position_ids
        cu = torch.tensor([0, 5, 8, 13], dtype=torch.int32)
        inputs |= dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)

        def from_position_ids(position_ids):
            raise AssertionError("the offsets given were not used")

        monkeypatch.setattr(hf_attention, "_exact_packed_offsets", from_position_ids)
    else:  # each row packed on its own
        ids = torch.randint(0, 100, (2, T), generator=torch.Generator().manual_seed(5))
        pos = torch.stack((inputs["position_ids"][0], torch.arange(T).roll(4) % T))  # row 1: 9..12, then 0..8
        inputs |= dict(input_ids=ids, position_ids=pos)
    with monkeypatch.context() as m:
        m.setenv("FASTTRAIN_BACKEND", "cpu")
        logits, grads = _run(model, "fasttrain", inputs)
    _assert_matches_eager(model, inputs, logits, grads)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["hole", "packed position_ids"])
def test_what_a_trace_cannot_branch_on_is_refused_on_the_device(models, case):
    model = models["llama"]
    inputs = _inputs("left" if case == "hole" else "packed")
    if case == "hole":
        inputs["attention_mask"][0, 6] = 0
    set_attn_implementation(model, "fasttrain")
    torch._dynamo.reset()
    with pytest.raises(RuntimeError, match="under torch.compile"):
        torch.compile(model, backend="aot_eager", fullgraph=True)(**inputs)


def test_a_padding_mask_with_a_hole_runs_the_reference_exactly(models):
    model = models["llama"]
    inputs = _inputs("left")
    inputs["attention_mask"][0, 6] = 0  # a masked token between real ones: no varlen cut expresses it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "fasttrain: attention runs on the reference")
        logits, grads = _run(model, "fasttrain", inputs)
    _assert_matches_eager(model, inputs, logits, grads)


def test_dropout_reaches_the_attention_op():
    q, k, v = (torch.randn(2, h, 9, 32, generator=torch.Generator().manual_seed(h)) for h in (4, 2, 2))
    module = torch.nn.Module()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "fasttrain: attention runs on the reference")
        torch.manual_seed(3)
        out, _ = fasttrain_attention_forward(module, q, k, v, None, dropout=0.25)
        torch.manual_seed(3)
        want = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.25, causal=True)
        no_dropout, _ = fasttrain_attention_forward(module, q, k, v, None)
    assert torch.equal(out, want)
    assert not torch.allclose(out, no_dropout)


def test_mask_function_returns_what_the_kernels_need():
    args = dict(batch_size=2, q_length=6, kv_length=6, allow_is_causal_skip=False, use_vmap=False)
    assert fasttrain_mask(**args, attention_mask=torch.ones(2, 6, dtype=torch.bool)) is None
    assert fasttrain_mask(**args) is None
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[0, :2] = False
    assert torch.equal(fasttrain_mask(**args, attention_mask=padded), padded)
    # a sliding layer's cache holds the last kv_length keys; a static cache's mask is shorter than its keys
    assert torch.equal(fasttrain_mask(**dict(args, kv_length=5), attention_mask=padded), padded[:, -5:])
    assert torch.equal(fasttrain_mask(**dict(args, kv_length=9), attention_mask=padded), padded)
    ones = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(fasttrain_mask(**dict(args, kv_length=9), attention_mask=ones), ones)
    # a model's own mask overlay (use_vmap) keeps transformers' full mask
    overlay = dict(args, use_vmap=True, mask_function=lambda b, h, q, kv: kv <= q)
    full = fasttrain_mask(**overlay, attention_mask=padded)
    assert full.shape == (2, 1, 6, 6) and not full[0, 0, :, :2].any()
    assert torch.equal(full[1, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(full, sdpa_mask(**overlay, attention_mask=padded))


def test_offsets():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 1, 1]], dtype=torch.bool)
    cu_q, cu_k, holes = padding_offsets(mask, 2)  # queries: the last two key positions
    assert cu_k.tolist() == [0, 2, 5, 5, 5, 8, 10, 15, 15, 15, 15, 20, 20]
    assert cu_q.tolist() == [0, 0, 2, 2, 2, 2, 4, 6, 6, 6, 6, 8, 8]
    assert cu_k.dtype == cu_q.dtype == torch.int32 and bool(holes)
    assert not padding_offsets(mask[:3], 5)[2]
    for Tq, causal in ((2, True), (5, True), (3, False)):  # the host-side twin gives the same offsets
        want_q, want_k, want_holes = padding_offsets(mask, Tq, causal)
        got_q, got_k, got_holes = padding_offsets_read(mask, Tq, causal)
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k) and got_holes == bool(want_holes)
    leftpad, seqlens = left_padding(mask[[0, 0]])  # pads, then real keys to the end
    assert leftpad.tolist() == [2, 2] and seqlens.tolist() == [5, 5] and leftpad.dtype == torch.int32
    assert all(left_padding(mask[[0, b]]) is None for b in (1, 2, 3))  # right padding, no real key, a hole
    cu, restarts = packed_offsets(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]]))
    assert cu.tolist() == [0, 0, 0, 3, 3, 5, 5, 5, 5, 5, 10] and bool(restarts)
    assert not packed_offsets(torch.arange(4)[None] + 2)[1]


@pytest.mark.filterwarnings("ignore:fasttrain. attention runs on the reference")  # the windowed case
@pytest.mark.parametrize("window", [None, 2])
def test_bidirectional_attention_with_padding_matches_torch(window, monkeypatch):
    # An encoder's (or a cross-attention's) padding mask: every query sees its row's real keys (within the window).
    B, H, Tq, Tk, D = 2, 4, 6, 9, 32
    q, k, v = (torch.randn(B, H, t, D, generator=torch.Generator().manual_seed(t)) for t in (Tq, Tk, Tk))
    mask = torch.ones(B, Tk, dtype=torch.bool)
    mask[0, :3], mask[1, 7:] = False, False
    module = torch.nn.Module()
    module.is_causal = False
    visible = mask[:, None, None, :].expand(B, 1, Tq, Tk)
    if window is not None:  # transformers' bidirectional window: |i - j| <= W, at Tq == Tk
        k, v, mask, Tk = k[:, :, :Tq], v[:, :, :Tq], mask[:, :Tq], Tq
        i, j = torch.arange(Tq)[:, None], torch.arange(Tk)
        visible = mask[:, None, None, :] & ((i - j).abs() <= window)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible).transpose(1, 2)
    with monkeypatch.context() as m:
        if window is None:  # the varlen kernel; a bidirectional window takes the reference
            m.setenv("FASTTRAIN_BACKEND", "cpu")
        out, _ = fasttrain_attention_forward(module, q, k, v, mask, sliding_window=window)
    assert (out - want).abs().max() < TOL


def test_the_reference_fallback_warns_only_outside_a_trace(monkeypatch):
    # A warning traced would break the graph (and fail fullgraph=True): the op chooser warns only in eager calls.
    from fasttrain.ops.attention import ATTENTION

    monkeypatch.delenv("FASTTRAIN_BACKEND", raising=False)
    monkeypatch.setattr(ATTENTION, "_warned", set())  # as in a fresh process: the first fallback warns
    q = torch.randn(1, 4, 5, 32)
    mask = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0)) > 0.3  # a user's own 4-D mask

    def attend(q, mask):
        return fasttrain_attention_forward(torch.nn.Module(), q, q, q, mask)[0]

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = torch.compile(attend, backend="eager", fullgraph=True)(q, mask)
    with pytest.warns(RuntimeWarning, match="attention runs on the reference"):
        eager = attend(q, mask)
    assert torch.equal(traced, eager)
