"""flash-attn's `flash_attn.modules.embedding`: `GPT2Embeddings` (word + learned position embeddings, optionally
embedded narrower and projected up, as OPT-350m) and `BertEmbeddings` (word + position + token type). Parameter
names and shapes are flash-attn's, so its state_dicts load. The tensor-parallel classes (`VocabParallelEmbedding`,
`ColumnParallelEmbedding`, `ParallelGPT2Embeddings`) are absent."""

import torch
from torch import Tensor, nn

from fasttrain._backend import ArgumentError

__all__ = ["BertEmbeddings", "GPT2Embeddings"]


def _check_ids(cls: str, **ids) -> int:
    """Each of ids (None or integer (batch, seqlen)); returns input_ids' seqlen."""
    input_ids = ids["input_ids"]
    for arg, t in ids.items():
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ArgumentError(f"{cls}: {arg} must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if arg == "input_ids" and t.ndim != 2:
            raise ArgumentError(f"{cls}: input_ids must be (batch, seqlen), got shape {tuple(t.shape)}")
    return input_ids.shape[1]


class GPT2Embeddings(nn.Module):
    """flash-attn's `GPT2Embeddings`: word_embeddings(input_ids) (+ position_embeddings(position_ids) when
    max_position_embeddings > 0; position_ids default 0..seqlen-1). word_embed_proj_dim: embed to that width, then
    project_in (no bias) up to embed_dim."""

    def __init__(
        self,
        embed_dim,
        vocab_size,
        max_position_embeddings,
        padding_idx=None,
        word_embed_proj_dim=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        width = embed_dim if word_embed_proj_dim is None else word_embed_proj_dim
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=padding_idx, **factory_kwargs)
        self.project_in = None
        if word_embed_proj_dim is not None:
            self.project_in = nn.Linear(word_embed_proj_dim, embed_dim, bias=False, **factory_kwargs)
        self.max_position_embeddings = max_position_embeddings
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory_kwargs)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """input_ids, position_ids (batch, seqlen) -> (batch, seqlen, embed_dim)."""
        seqlen = _check_ids("GPT2Embeddings", input_ids=input_ids, position_ids=position_ids)
        embeddings = self.word_embeddings(input_ids)
        if self.project_in is not None:
            embeddings = self.project_in(embeddings)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = torch.arange(seqlen, dtype=torch.long, device=input_ids.device)
            embeddings = embeddings + self.position_embeddings(position_ids)
        return embeddings


class BertEmbeddings(nn.Module):
    """flash-attn's `BertEmbeddings`: word_embeddings(input_ids) + position_embeddings(position_ids) (when
    max_position_embeddings > 0; default 0..seqlen-1) + token_type_embeddings(token_type_ids) (when
    type_vocab_size > 0; default all type 0)."""

    def __init__(
        self,
        embed_dim,
        vocab_size,
        max_position_embeddings,
        type_vocab_size,
        padding_idx=None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.word_embeddings = nn.Embedding(vocab_size, embed_dim, padding_idx=padding_idx, **factory_kwargs)
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        if max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(max_position_embeddings, embed_dim, **factory_kwargs)
        if type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(type_vocab_size, embed_dim, **factory_kwargs)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """input_ids, position_ids, token_type_ids (batch, seqlen) -> (batch, seqlen, embed_dim)."""
        ids = {"input_ids": input_ids, "position_ids": position_ids, "token_type_ids": token_type_ids}
        seqlen = _check_ids("BertEmbeddings", **ids)
        embeddings = self.word_embeddings(input_ids)
        if self.max_position_embeddings > 0:
            if position_ids is None:
                position_ids = torch.arange(seqlen, dtype=torch.long, device=input_ids.device)
            embeddings = embeddings + self.position_embeddings(position_ids)
        if self.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = torch.zeros(seqlen, dtype=torch.long, device=input_ids.device)
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return embeddings
