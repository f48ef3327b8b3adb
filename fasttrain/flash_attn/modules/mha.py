"""flash-attn's `flash_attn.modules.mha`: `MHA` (self- and cross-attention with its projections, GQA, rotary, ALiBi,
sliding window, packed varlen rows and KV-cache decoding), the attention modules inside it and `get_alibi_slopes`,
over fasttrain's attention functions. Parameter names and shapes are flash-attn's, so a state_dict saved from
flash-attn's MHA loads. `ParallelMHA` (tensor parallel) is absent."""

import torch
from torch import Tensor, nn

from fasttrain._backend import ArgumentError
from fasttrain.flash_attn.modules._attention import (
    CrossAttention,
    FlashCrossAttention,
    FlashSelfAttention,
    SelfAttention,
    get_alibi_slopes,
)
from fasttrain.ops import flash_attn_with_kvcache
from fasttrain.ops.rotary import RotaryEmbedding

__all__ = ["MHA", "CrossAttention", "FlashCrossAttention", "FlashSelfAttention", "SelfAttention", "get_alibi_slopes"]


def _update_kv_cache(kv: Tensor, inference_params, layer_idx) -> Tensor:
    """Writes kv (B, T, 2, Hkv, D) at rows batch_size_offset.. and positions seqlen_offset.. of the layer's cache
    (allocated on first use, (max_batch_size, max_seqlen, 2, Hkv, D)); returns the cache's rows so far
    (B, seqlen_offset + T, 2, Hkv, D)."""
    cache = inference_params.key_value_memory_dict.get(layer_idx)
    if cache is None:
        shape = (inference_params.max_batch_size, inference_params.max_seqlen, *kv.shape[2:])
        cache = torch.empty(shape, dtype=kv.dtype, device=kv.device)
        inference_params.key_value_memory_dict[layer_idx] = cache
    b0, t0 = inference_params.batch_size_offset, inference_params.seqlen_offset
    b1, t1 = b0 + kv.shape[0], t0 + kv.shape[1]
    if b1 > cache.shape[0]:
        raise ArgumentError(f"inference_params: batch rows {b0}..{b1} pass the cache's max_batch_size {cache.shape[0]}")
    if t1 > cache.shape[1]:
        raise ArgumentError(f"inference_params: positions {t0}..{t1} pass the cache's max_seqlen {cache.shape[1]}")
    cache[b0:b1, t0:t1] = kv
    return cache[b0:b1, :t1]


def _causal_conv(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """x (B, T, C) through a depthwise Conv1d padded by 2 on both sides, keeping the first T outputs: output t sees
    inputs t - 2 .. t."""
    return conv(x.transpose(1, 2))[..., :-2].transpose(1, 2).contiguous()  # (B, C, T + 2) -> (B, T, C)


class MHA(nn.Module):
    """flash-attn's `MHA`: multi-head self-attention (or cross-attention) with its input and output projections.

    num_heads_kv: GQA/MQA key heads (None: num_heads). cross_attn: q from x (Wq), k and v from x_kv (Wkv).
    use_flash_attn picks FlashSelfAttention/FlashCrossAttention (needed for ALiBi, window_size, cu_seqlens and the
    KV-cache decode kernel) over SelfAttention/CrossAttention (needed for key_padding_mask). rotary_emb_dim > 0
    rotates that many leading dims of q and k (RotaryEmbedding with rotary_emb_base, _scale_base (XPos),
    _interleaved). dwconv: a causal depthwise convolution (kernel 3) over the projections. return_residual: forward
    returns (out, x). checkpointing recomputes the attention in backward. fused_bias_fc is accepted and the
    projections are nn.Linear either way, as in flash-attn 2.8, which dropped its fused_dense projections.
    layer_idx keys this layer's cache in InferenceParams."""

    def __init__(
        self,
        embed_dim,
        num_heads,
        num_heads_kv=None,
        cross_attn=False,
        qkv_proj_bias=True,
        out_proj_bias=True,
        dropout=0.0,
        softmax_scale=None,
        causal=False,
        layer_idx=None,
        dwconv=False,
        rotary_emb_dim=0,
        rotary_emb_base=10000.0,
        rotary_emb_scale_base=None,
        rotary_emb_interleaved=False,
        use_alibi=False,
        window_size=(-1, -1),
        fused_bias_fc=False,
        use_flash_attn=False,
        return_residual=False,
        checkpointing=False,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.cross_attn = cross_attn
        self.causal = causal
        self.layer_idx = layer_idx
        self.dwconv = dwconv
        self.rotary_emb_dim = rotary_emb_dim
        self.use_flash_attn = use_flash_attn
        self.return_residual = return_residual
        self.checkpointing = checkpointing
        if use_alibi and not use_flash_attn:
            raise ArgumentError("use_alibi=True needs use_flash_attn=True (ALiBi is on the flash path only)")
        if tuple(window_size) != (-1, -1) and not use_flash_attn:
            raise ArgumentError(f"window_size={window_size} needs use_flash_attn=True (on the flash path only)")
        alibi_slopes = torch.tensor(get_alibi_slopes(num_heads), device=device) if use_alibi else None

        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if self.num_heads_kv < 1 or num_heads % self.num_heads_kv:
            raise ArgumentError(f"num_heads_kv ({self.num_heads_kv}) must divide num_heads ({num_heads})")
        if embed_dim % num_heads:
            raise ArgumentError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.head_dim = embed_dim // num_heads
        qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        kv_dim = 2 * self.head_dim * self.num_heads_kv

        if rotary_emb_dim > 0:
            if cross_attn:
                raise ArgumentError("rotary_emb_dim > 0 needs cross_attn=False (as flash-attn's MHA)")
            self.rotary_emb = RotaryEmbedding(
                rotary_emb_dim,
                base=rotary_emb_base,
                scale_base=rotary_emb_scale_base,
                interleaved=rotary_emb_interleaved,
                device=device,
            )
        if not cross_attn:
            self.Wqkv = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, **factory_kwargs)
        else:
            self.Wq = nn.Linear(embed_dim, embed_dim, bias=qkv_proj_bias, **factory_kwargs)
            self.Wkv = nn.Linear(embed_dim, kv_dim, bias=qkv_proj_bias, **factory_kwargs)
        # The convolutions take the default device and dtype, as flash-attn's (so their state_dict entries match).
        if dwconv and self.num_heads_kv == num_heads:
            self.dwconv_qkv = nn.Conv1d(qkv_dim, qkv_dim, kernel_size=3, padding=2, groups=qkv_dim)
        elif dwconv:
            self.dwconv_q = nn.Conv1d(embed_dim, embed_dim, kernel_size=3, padding=2, groups=embed_dim)
            self.dwconv_kv = nn.Conv1d(kv_dim, kv_dim, kernel_size=3, padding=2, groups=kv_dim)
        inner = {"causal": causal, "softmax_scale": softmax_scale, "attention_dropout": dropout}
        if use_flash_attn:
            flash = {"alibi_slopes": alibi_slopes, "window_size": window_size}
            self.inner_attn = FlashSelfAttention(**inner, **flash)
            self.inner_cross_attn = FlashCrossAttention(**inner, **flash)
        else:
            self.inner_attn, self.inner_cross_attn = SelfAttention(**inner), CrossAttention(**inner)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=out_proj_bias, **factory_kwargs)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None) -> Tensor:
        """An empty KV cache (batch_size, max_seqlen, 2, Hkv, D) for InferenceParams.key_value_memory_dict, in
        out_proj's dtype (or dtype) on its device."""
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        shape = (batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim)
        return torch.empty(shape, dtype=dtype, device=self.out_proj.weight.device)

    def _check_layer_idx(self) -> None:
        if self.layer_idx is None:
            raise ArgumentError("inference_params needs the layer_idx given to MHA's constructor (it keys the cache)")

    def _update_kv_cache(self, kv: Tensor, inference_params) -> Tensor:
        """kv (B, T, 2, Hkv, D) into the cache; returns the cache's rows so far."""
        self._check_layer_idx()
        return _update_kv_cache(kv, inference_params, self.layer_idx)

    def _decode(self, q: Tensor, kv: Tensor, inference_params, rotary: bool) -> Tensor:
        """q (B, Tq, H, D) against the cache, appending kv (B, T, 2, Hkv, D) at each sequence's length, through
        flash_attn_with_kvcache; with rotary, the kernel rotates q and the new keys. window_size is not passed, as in
        flash-attn's MHA: a decoded token attends the whole cache."""
        self._check_layer_idx()
        options = {}
        if rotary:
            if self.rotary_emb.scale is not None:
                raise ArgumentError("rotary_emb_scale_base (XPos) cannot decode with a KV cache (as flash-attn)")
            self.rotary_emb._update_cos_sin_cache(inference_params.max_seqlen, device=q.device, dtype=q.dtype)
            options = {
                "rotary_cos": self.rotary_emb._cos_cached,
                "rotary_sin": self.rotary_emb._sin_cached,
                "rotary_interleaved": self.rotary_emb.interleaved,
            }
        if self.layer_idx not in inference_params.key_value_memory_dict:
            raise ArgumentError(
                f"inference_params has no cache for layer_idx {self.layer_idx}: run the prompt at seqlen_offset 0 "
                "first, or put allocate_inference_cache(...) in its key_value_memory_dict"
            )
        batch = q.shape[0]
        cache = inference_params.key_value_memory_dict[self.layer_idx][:batch]  # (B, Tmax, 2, Hkv, D)
        lengths = inference_params.lengths_per_sample
        return flash_attn_with_kvcache(
            q,
            cache[:, :, 0],
            cache[:, :, 1],
            kv[:, :, 0],
            kv[:, :, 1],
            cache_seqlens=lengths[:batch] if lengths is not None else inference_params.seqlen_offset,
            softmax_scale=self.inner_cross_attn.softmax_scale,
            causal=self.inner_cross_attn.causal,
            alibi_slopes=getattr(self.inner_cross_attn, "alibi_slopes", None),
            **options,
        )

    def _update_kvcache_attention(self, q: Tensor, kv: Tensor, inference_params) -> Tensor:
        """The prefill (seqlen_offset 0), and every step without use_flash_attn, write kv into the cache and attend
        over its rows so far; later flash steps decode through the kernel."""
        if inference_params.seqlen_offset == 0 or not self.use_flash_attn:
            return self.inner_cross_attn(q, self._update_kv_cache(kv, inference_params))
        return self._decode(q, kv, inference_params, rotary=False)

    def _check_forward(self, x, x_kv, key_padding_mask, cu_seqlens, max_seqlen, mixer_subset, inference_params):
        """flash-attn's asserts, as errors naming the argument."""
        if not isinstance(x, Tensor) or x.dim() != (2 if cu_seqlens is not None else 3):
            layout = "(total, embed_dim) with cu_seqlens" if cu_seqlens is not None else "(B, T, embed_dim)"
            raise ArgumentError(f"x must be {layout}, got {getattr(x, 'shape', type(x).__name__)}")
        if x.shape[-1] != self.embed_dim:
            raise ArgumentError(f"x's last dimension must be embed_dim ({self.embed_dim}), got {x.shape[-1]}")
        if cu_seqlens is not None:
            if max_seqlen is None:
                raise ArgumentError("cu_seqlens needs max_seqlen")
            for wrong, name in (
                (key_padding_mask is not None, "key_padding_mask"),
                (not self.use_flash_attn, "use_flash_attn=False"),
                (self.dwconv, "dwconv"),
                (self.rotary_emb_dim != 0, "rotary_emb_dim > 0"),
            ):
                if wrong:
                    raise ArgumentError(f"cu_seqlens (packed rows) cannot be used with {name}")
        if key_padding_mask is not None and (max_seqlen is not None or self.use_flash_attn):
            raise ArgumentError("key_padding_mask needs use_flash_attn=False and no cu_seqlens/max_seqlen")
        if inference_params is not None:
            for wrong, name in (
                (key_padding_mask is not None, "key_padding_mask"),
                (cu_seqlens is not None, "cu_seqlens"),
                (max_seqlen is not None, "max_seqlen"),
                (self.dwconv, "dwconv"),
            ):
                if wrong:
                    raise ArgumentError(f"inference_params cannot be used with {name}")
        if not self.cross_attn and (x_kv is not None or mixer_subset is not None):
            raise ArgumentError("x_kv and mixer_subset are for cross_attn=True only")
        if self.dwconv and (self.cross_attn or self.num_heads_kv != self.num_heads):
            # flash-attn's forward fails here too: it convolves q and kv after splitting them into heads.
            raise ArgumentError("dwconv works with cross_attn=False and num_heads_kv == num_heads only")

    def forward(
        self,
        x,
        x_kv=None,
        key_padding_mask=None,
        cu_seqlens=None,
        max_seqlen=None,
        mixer_subset=None,
        inference_params=None,
        **kwargs,
    ):
        """x (B, T, embed_dim), or (total, embed_dim) packed rows with cu_seqlens (B + 1,) int32 and max_seqlen
        (use_flash_attn only) -> out of x's shape, or (out, x) with return_residual.

        x_kv (B, Tk, embed_dim): cross_attn's keys and values (None: x). mixer_subset: cross_attn only, indexes x's
        dim 1 before the query projection (a ViT's CLS token). key_padding_mask (B, T) bool, True keeps a key
        (use_flash_attn=False only). inference_params: an InferenceParams for generation; the caller advances its
        seqlen_offset. Other keyword arguments go to the inner attention module (e.g. causal)."""
        args = (x, x_kv, key_padding_mask, cu_seqlens, max_seqlen, mixer_subset, inference_params)
        self._check_forward(*args)
        if self.use_flash_attn:
            kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen, **kwargs}
        else:
            kwargs = {"key_padding_mask": key_padding_mask, **kwargs}
        offset, rotary_max_seqlen = 0, None
        if inference_params is not None:
            lengths = inference_params.lengths_per_sample
            offset = lengths if lengths is not None else inference_params.seqlen_offset
            rotary_max_seqlen = inference_params.max_seqlen
        # One kernel call rotates, appends and attends once the prompt is cached; it rotates 16-dim multiples only.
        fused = (
            inference_params is not None
            and inference_params.seqlen_offset != 0
            and self.rotary_emb_dim > 0
            and self.rotary_emb_dim % 16 == 0
            and self.use_flash_attn
        )
        H, Hkv, D = self.num_heads, self.num_heads_kv, self.head_dim
        packed = not self.cross_attn and Hkv == H  # one qkv tensor, for the self-attention module
        if packed:
            qkv = self.Wqkv(x)
            if self.dwconv:
                qkv = _causal_conv(self.dwconv_qkv, qkv)
            qkv = qkv.unflatten(-1, (3, H, D))  # (..., 3, H, D)
            if self.rotary_emb_dim > 0 and not fused:
                qkv = self.rotary_emb(qkv, seqlen_offset=offset, max_seqlen=rotary_max_seqlen)
        else:
            if self.cross_attn:
                q = self.Wq(x if mixer_subset is None else x[:, mixer_subset])
                kv = self.Wkv(x_kv if x_kv is not None else x)
                q, kv = q.unflatten(-1, (H, D)), kv.unflatten(-1, (2, Hkv, D))  # (..., H, D), (..., 2, Hkv, D)
            else:  # rotary needs cross_attn=False (checked at construction)
                qkv = self.Wqkv(x).unflatten(-1, (H + 2 * Hkv, D))  # (..., H + 2 Hkv, D)
                if self.rotary_emb_dim > 0 and not fused:
                    # one in-place rotation of the whole projection (GQA's num_heads_q), the same values as turning q
                    # and kv apart; two in-place ops on views of one base break torch.compile's functionalization
                    qkv = self.rotary_emb(qkv, seqlen_offset=offset, max_seqlen=rotary_max_seqlen, num_heads_q=H)
                q, kv = qkv[..., :H, :], qkv[..., H:, :].unflatten(-2, (2, Hkv))  # (..., H, D), (..., 2, Hkv, D)
        if inference_params is None:
            inner, inputs = (self.inner_attn, (qkv,)) if packed else (self.inner_cross_attn, (q, kv))
            context = self._attend(inner, inputs, kwargs)
        else:
            if packed:
                q, kv = qkv[:, :, 0], qkv[:, :, 1:]  # (B, T, H, D), (B, T, 2, H, D)
            if fused:
                context = self._decode(q, kv, inference_params, rotary=True)
            else:
                context = self._update_kvcache_attention(q, kv, inference_params)
        out = self.out_proj(context.flatten(-2))  # (..., H, D) -> (..., embed_dim)
        return out if not self.return_residual else (out, x)

    def _attend(self, inner: nn.Module, inputs: tuple, kwargs: dict) -> Tensor:
        if not self.checkpointing:
            return inner(*inputs, **kwargs)
        # Non-reentrant: the reentrant variant (torch's default, which flash-attn's call leaves) refuses keyword
        # arguments, and kwargs always holds cu_seqlens/max_seqlen or key_padding_mask.
        return torch.utils.checkpoint.checkpoint(inner, *inputs, use_reentrant=False, **kwargs)
