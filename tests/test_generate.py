"""fasttrain.generate: static KV cache, sampling, stop tokens, batches of uneven prompts; greedy decoding with the
cache must give exactly the tokens of full recompute with the reference ops.

Generation runs as a CPU user runs it (conftest.cpu_user: the C++ kernels); the kernels' own tests cover the Triton
ones, interpreted here and compiled on a GPU (the gpu tests below). The tests about the loop itself run every op on
the reference backend."""

import pytest
import torch

from fasttrain.generate import CACHE_ROUND, KVCache, generate, sample
from fasttrain.model import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("cpu_user")

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2], [7]]  # lengths 5, 17, 1


def _model(positions="rotary", n_kv_head=2, device="cpu", dtype=torch.float32, n_layer=2, **options):
    torch.manual_seed(0)
    cfg = GPTConfig(
        n_layer=n_layer,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=128,
        vocab_size=64,
        max_seq_len=64,
        positions=positions,
        **options,
    )
    model = GPT(cfg)
    with torch.no_grad():  # large weights: a chaotic model whose greedy paths vary, not one repeated token
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.3)
    return model.to(device=device, dtype=dtype)


@pytest.fixture
def reference_ops(monkeypatch):
    monkeypatch.setenv("FASTTRAIN_BACKEND", "reference")


@torch.no_grad()
def _greedy_by_recompute(model, prompt, n, backend="reference"):
    """The oracle: each prompt alone, the whole sequence run again for every new token, no cache."""
    idx = torch.tensor([prompt], device=next(model.parameters()).device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTTRAIN_BACKEND", backend)
        for _ in range(n):
            logits, _ = model(idx)  # (1, T, V)
            idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx[0, len(prompt) :].tolist()


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_greedy_with_cache_equals_full_recompute(positions):
    model = _model(positions).eval()
    want = [_greedy_by_recompute(model, p, 8) for p in PROMPTS]
    assert len({t for seq in want for t in seq}) > 6  # the oracle's paths are varied enough to mean something
    got = generate(model, PROMPTS, 8, temperature=0.0)
    assert got.tokens == want
    assert got.new_tokens == 24 and got.prompt_tokens == 23 and got.tokens_per_s > 0


def test_sliding_window_decodes_as_it_recomputes():
    # Layer 0 attends fully, layer 1 through a window of 6 keys: shorter than the 17-token prompt and its continuation.
    model = _model(sliding_window=6, full_attention_layers=1).eval()
    want = [_greedy_by_recompute(model, p, 8) for p in PROMPTS]
    assert generate(model, PROMPTS, 8, temperature=0.0).tokens == want
    full = _model().eval()
    assert [_greedy_by_recompute(full, p, 8) for p in PROMPTS] != want  # the window changes what the model says


def test_compiled_decode_step_matches_eager():
    # torch.compile traces the cache hand-off and the registered decode op (opaque to it, with a fake kernel); one
    # layer holds every kind of op the step has, and compiling costs time per op.
    model = _model(n_layer=1).eval()
    eager = generate(model, PROMPTS, 4, temperature=0.0)
    compiled = generate(model, PROMPTS, 4, temperature=0.0, compile=True)
    assert compiled.tokens == eager.tokens and compiled.setup_s > 0


def test_stop_tokens_and_streaming(reference_ops):
    model = _model()
    full = generate(model, PROMPTS, 10, temperature=0.0).tokens
    # Stop at a token that prompt 0 emits for the first time at step 4.
    stop = next(t for i, t in enumerate(full[0]) if i >= 3 and t not in full[0][:i])
    streamed = []
    result = generate(
        model, PROMPTS, 10, temperature=0.0, stop_tokens=[stop], on_token=lambda i, t: streamed.append((i, t))
    )
    want = [seq[: seq.index(stop)] if stop in seq else seq for seq in full]
    assert result.tokens == want and len(want[0]) >= 3
    assert [[t for i, t in streamed if i == b] for b in range(3)] == want


def test_sampling_is_seeded_and_restores_training_mode(reference_ops):
    model = _model().train()
    a = generate(model, PROMPTS, 6, temperature=1.0, top_k=8, top_p=0.9, seed=1).tokens
    b = generate(model, PROMPTS, 6, temperature=1.0, top_k=8, top_p=0.9, seed=1).tokens
    assert a == b and model.training


def test_padded_vocabulary_ids_are_never_drawn(reference_ops):
    # The trainer pads the embedding to a multiple of 64; ids past the tokenizer's (here 40 of 64) mean nothing.
    model = _model()
    drawn = generate(model, PROMPTS, 20, temperature=2.0, seed=0).tokens
    assert max(t for seq in drawn for t in seq) >= 40  # the chaotic model draws them when allowed
    kept = generate(model, PROMPTS, 20, temperature=2.0, seed=0, vocab_size=40).tokens
    assert max(t for seq in kept for t in seq) < 40 and sum(map(len, kept)) == 60


def test_sample_filters_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)  # (N, V)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits[:2], temperature=0.0), torch.zeros(2, dtype=torch.long))
    assert sample(logits, top_k=1, generator=g).eq(0).all()
    assert sample(logits, top_p=0.4, generator=g).eq(0).all()

    def freqs(**kw):
        return torch.bincount(sample(logits, generator=g, **kw), minlength=4).float() / len(logits)

    # top_p 0.9 keeps {0, 1, 2} (0.5 + 0.3 < 0.9 <= 0.95); top_k 2 keeps {0, 1}; both renormalize.
    torch.testing.assert_close(freqs(top_p=0.9), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015, rtol=0)
    torch.testing.assert_close(freqs(top_k=2), torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8, atol=0.015, rtol=0)
    # temperature 2 flattens: p ~ sqrt(p).
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05]).sqrt()
    torch.testing.assert_close(freqs(temperature=2.0), flat / flat.sum(), atol=0.015, rtol=0)


def test_cache_shapes_are_static():
    cache = KVCache(n_layer=2, batch=3, max_len=CACHE_ROUND + 1, device=torch.device("cpu"))
    assert cache.max_len == 2 * CACHE_ROUND
    cache.seqlens.copy_(torch.tensor([0, 5, 9]))
    assert cache.positions(2).tolist() == [[0, 1], [5, 6], [9, 10]]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(prompts=[[1] * 60], max_new_tokens=6), "exceeds the model's max_seq_len 64"),
        (dict(prompts=[[1], []]), r"prompts\[1\] must be a non-empty list"),
        (dict(prompts=[[1, 64]]), r"prompts\[0\] must be a non-empty list of token ids in \[0, 64\)"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be >= 0"),
        (dict(top_p=float("nan")), r"top_p must be None or in \(0, 1\]"),
        (dict(top_k=0), "top_k must be None or an int >= 1"),
        (dict(top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(cuda_graph=True), "cuda_graph=True needs the model on a CUDA device"),
        (dict(vocab_size=65), r"vocab_size must be an int in \[1, the model's 64\], got 65"),
    ],
)
def test_bad_arguments_raise(kwargs, match, reference_ops):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(_model(), args.pop("prompts"), args.pop("max_new_tokens"), **args)


@torch.no_grad()
def _assert_greedy_up_to_rounding(model, prompts, tokens):
    """Each greedy token is the argmax of a full no-cache forward over the final sequence, up to a bf16 near-tie:
    exact token equality would fail on ties that bf16 rounding breaks either way."""
    for prompt, new in zip(prompts, tokens):
        idx = torch.tensor([prompt + new], device="cuda")
        logits = model(idx)[0][0, len(prompt) - 1 : -1].float()  # (n_new, V): the logits each new token came from
        chosen = logits.gather(-1, torch.tensor(new, device="cuda")[:, None])[:, 0]
        tie = 0.02 * logits.abs().amax(dim=-1)  # bf16 keeps 8 bits: ~0.4% per rounding, a few roundings deep
        assert (logits.amax(dim=-1) - chosen <= tie).all(), (prompt, new)


def test_the_decode_step_is_captured_by_default_on_cuda_only(monkeypatch):
    from fasttrain import generate as generation

    seen, step = [], generation._decode_step
    monkeypatch.setattr(generation, "_decode_step", lambda *a: seen.append(a[-1]) or step(*a))
    model = _model()
    generate(model, PROMPTS, 3, temperature=0.0)  # CPU: no graph
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        generate(model, PROMPTS, 3, temperature=0.0, cuda_graph=True)
    assert seen == [False]


@pytest.mark.gpu
def test_gpu_default_generation_replays_a_captured_decode_step(monkeypatch):
    captures, graph = [], torch.cuda.CUDAGraph
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda *a, **k: captures.append(1) or graph(*a, **k))
    model = _model(device="cuda", dtype=torch.bfloat16)
    default = generate(model, PROMPTS, 24, temperature=0.0)
    assert captures == [1]
    assert default.tokens == generate(model, PROMPTS, 24, temperature=0.0, cuda_graph=False).tokens


@pytest.mark.gpu
@pytest.mark.parametrize(
    "mode",
    [dict(cuda_graph=True), dict(compile=True), dict(compile=True, cuda_graph=True)],
    ids=["graph", "compile", "compile+graph"],
)
def test_gpu_decode_step_modes(mode):
    model = _model(device="cuda", dtype=torch.bfloat16)
    eager = generate(model, PROMPTS, 24, temperature=0.0, cuda_graph=False)
    got = generate(model, PROMPTS, 24, temperature=0.0, **{"cuda_graph": False, **mode})
    _assert_greedy_up_to_rounding(model, PROMPTS, eager.tokens)
    _assert_greedy_up_to_rounding(model, PROMPTS, got.tokens)
    if not mode.get("compile"):  # the graph replays the eager kernels: bit for bit the same tokens
        assert got.tokens == eager.tokens
