"""flash-attn's `flash_attn.utils.generation`: only `InferenceParams`, the decoding state that
`fasttrain.flash_attn.modules.mha.MHA` reads and fills. flash-attn's `decode`, sampling and CUDA-graph helpers are
absent (fasttrain's own generation is `fasttrain.generate`)."""

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class InferenceParams:
    """What a model passes to each layer while it generates: the cache's bounds, where the next tokens go, and the
    per-layer KV caches.

    max_seqlen, max_batch_size: the bounds of each cache a layer allocates, (max_batch_size, max_seqlen, 2, Hkv, D).
    seqlen_offset: tokens already in the cache; the caller advances it after each forward.
    batch_size_offset: the first cache row of this batch (the prefill path writes rows from it).
    key_value_memory_dict: layer_idx -> that layer's cache.
    lengths_per_sample: (B,) int32 tokens per sequence, or None to use seqlen_offset for every sequence."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Tensor | None = None

    def reset(self, max_seqlen, max_batch_size):
        """Start a new generation: new bounds, nothing cached (the caches themselves are kept and overwritten)."""
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()
