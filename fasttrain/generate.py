"""Text generation from a GPT with a static, preallocated KV cache.

    result = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=64, temperature=0.8, top_k=200,
                      stop_tokens=[tok.eot_id], on_token=lambda i, t: ...)
    result.tokens  # new tokens per prompt; result.tokens_per_s, result.prefill_s, result.decode_s

The prompts of a batch may differ in length: they are right-padded into one prefill (causal attention keeps the
padding out of every real token's view), then each sequence decodes from its own length (`cache_seqlens` per
sequence). The cache is allocated once with its length rounded up, so the decode step has fixed shapes and can be
compiled (`compile=True`) or captured in a CUDA graph (`cuda_graph=True`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fasttrain.ops import flash_attn_func, flash_attn_with_kvcache

CACHE_ROUND = 256  # cache rows are a multiple of this, so nearby requests share shapes (and compiled graphs)


class KVCache:
    """Keys and values of every layer for a batch, preallocated: (n_layer, B, max_len, Hkv, D) each.

    Implements the model's cache hand-off: `positions(T)` and `attend(layer, q, k, v)`. The first forward through
    it is the prefill (the cache is empty: attention over the prompt itself, its k/v copied in); every later one
    appends at `seqlens` through the decode kernel. The caller advances `seqlens` after each decode forward.
    Storage is allocated at the first `attend`, in the dtype the model computes k in (so autocast is respected).
    """

    def __init__(self, n_layer: int, batch: int, max_len: int, device: torch.device):
        self.n_layer, self.batch = n_layer, batch
        self.max_len = -(-max_len // CACHE_ROUND) * CACHE_ROUND
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)  # rows filled per sequence
        self.prefilling = True
        self.k = self.v = None

    def positions(self, T: int) -> torch.Tensor:
        return self.seqlens[:, None].long() + torch.arange(T, device=self.seqlens.device)  # (B, T)

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size=(-1, -1)
    ) -> torch.Tensor:
        if self.k is None:
            shape = (self.n_layer, self.batch, self.max_len) + tuple(k.shape[2:])  # (L, B, Tmax, Hkv, D)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        if self.prefilling:
            T = k.shape[1]
            self.k[layer, :, :T] = k
            self.v[layer, :, :T] = v
            return flash_attn_func(q, k, v, causal=True, window_size=window_size)
        # Lengths were checked against max_len before decoding started: no per-layer host sync.
        return flash_attn_with_kvcache(
            q,
            self.k[layer],
            self.v[layer],
            k,
            v,
            cache_seqlens=self.seqlens,
            causal=True,
            window_size=window_size,
            check_lengths=False,
        )


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row of logits (B, V): argmax when temperature == 0, else a draw from softmax(logits / T)
    restricted to the top_k most likely tokens and to the smallest set of them whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the ones ranked before it already reach top_p; the most likely one always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New tokens per prompt, stop tokens left out."""
    prompt_tokens: int
    """Prompt tokens over the batch."""
    prefill_s: float
    """Seconds for the prefill forward and the first sampled token."""
    decode_s: float
    """Seconds for every later token (decode steps, sampling, callbacks)."""
    setup_s: float
    """Seconds spent compiling and warming up / capturing the decode step (0 without compile or cuda_graph)."""

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill and decode (setup left out: it is paid once per shape)."""
        return self.new_tokens / max(self.prefill_s + self.decode_s, 1e-9)


def _check(model, prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) and 0 <= t < vocab for t in p):
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids in [0, {vocab})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    # The last new token is never fed back, so positions run up to len + max_new_tokens - 2.
    longest = max(len(p) for p in prompts) + max_new_tokens - 1
    if longest > model.config.max_seq_len:
        raise ValueError(
            f"longest prompt + max_new_tokens - 1 = {longest} exceeds the model's max_seq_len "
            f"{model.config.max_seq_len}"
        )
    if not temperature >= 0:  # NaN too
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


def _decode_step(model, cache: KVCache, batch: int, device: torch.device, compile: bool, cuda_graph: bool):
    """tokens (B, 1) -> next-token logits (B, V), appending to the cache (the caller advances cache.seqlens)."""

    def step(tokens: torch.Tensor) -> torch.Tensor:
        logits, _ = model(tokens, cache=cache)  # (B, 1, V)
        return logits[:, -1]

    if compile:
        step = torch.compile(step, dynamic=False)
    static_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
    if not cuda_graph:
        if compile:  # compile now rather than inside the timed decode loop; see the warm-up note below
            step(static_tokens)
        return step
    # Warm-up off the capture (Triton autotuning and compilation happen here). It writes k/v rows at the current
    # seqlens, which the first real step overwrites.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static_tokens)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = step(static_tokens)

    def replay(tokens: torch.Tensor) -> torch.Tensor:
        static_tokens.copy_(tokens)
        graph.replay()
        return static_logits

    return replay


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Iterable[int] = (),
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    compile: bool = False,
    cuda_graph: bool | None = None,
    vocab_size: int | None = None,
) -> GenerationResult:
    """Continue each prompt by up to max_new_tokens tokens.

    model: a fasttrain GPT (its forward takes `cache=`); it runs in eval mode here and gets its mode back after.
    temperature 0 is greedy; top_k / top_p restrict sampling (see `sample`); seed makes the draws repeatable.
    A sequence stops at its first token in stop_tokens (left out of the result); the batch stops when all have.
    on_token(i, token) is called for every new token of prompt i as soon as it is chosen (for streaming).
    compile: torch.compile the decode step. cuda_graph: capture it in a CUDA graph (CUDA only); None (default)
    captures it on a CUDA device, where one replay per token takes the place of the step's many launches (their host
    time is most of an eager decode step at small batch: benchmarks/NOTES.md), and not elsewhere.
    vocab_size: draw ids below it only: the tokenizer's, when the model's embedding is padded (to a multiple of 64, as
    the trainer pads it) with ids no tokenizer has, which an early checkpoint still gives weight.
    """
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    limit = model.config.vocab_size if vocab_size is None else vocab_size
    if not isinstance(limit, int) or not 1 <= limit <= model.config.vocab_size:
        raise ValueError(f"vocab_size must be an int in [1, the model's {model.config.vocab_size}], got {vocab_size!r}")
    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    stop = set(stop_tokens)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    B = len(prompts)
    Tp = max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    # (B, Tp), right-padded with 0: built on the host, one copy to the device
    idx = torch.tensor([list(p) + [0] * (Tp - len(p)) for p in prompts], dtype=torch.long, device=device)
    cache = KVCache(model.config.n_layer, B, Tp + max_new_tokens, device)

    out: list[list[int]] = [[] for _ in prompts]
    running = [True] * B

    def emit(tokens: list[int]) -> bool:
        """Record one new token per running sequence; False once every sequence has stopped."""
        for i, token in enumerate(tokens):
            if running[i] and token in stop:
                running[i] = False
            elif running[i]:
                out[i].append(token)
                if on_token is not None:
                    on_token(i, token)
        return any(running)

    was_training = model.training
    model.eval()
    try:
        start = time.perf_counter()
        logits, _ = model(idx, cache=cache)  # (B, Tp, V)
        cache.prefilling = False
        cache.seqlens.copy_(lengths)
        next_tokens = sample(
            logits[torch.arange(B, device=device), lengths - 1, :limit], temperature, top_k, top_p, generator
        )  # (B,)
        tokens = next_tokens.tolist()  # the one host sync per token
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        step = _decode_step(model, cache, B, device, compile, cuda_graph) if max_new_tokens > 1 else None
        setup_s = time.perf_counter() - start
        start = time.perf_counter()
        for n in range(1, max_new_tokens + 1):
            if not emit(tokens) or n == max_new_tokens:
                break
            logits = step(next_tokens[:, None])  # (B, V)
            cache.seqlens += 1
            next_tokens = sample(logits[:, :limit], temperature, top_k, top_p, generator)
            tokens = next_tokens.tolist()
        decode_s = time.perf_counter() - start
    finally:
        model.train(was_training)
    return GenerationResult(out, int(lengths.sum()), prefill_s, decode_s, setup_s)
