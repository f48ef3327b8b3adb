"""fasttrain.flash_attn mirrors flash-attn's module layout: every name flash-attn 2.8's modules export that fasttrain
implements imports from the mirrored path as the very object fasttrain.ops gives, so replacing `flash_attn` with
`fasttrain.flash_attn` in a script's imports is the whole switch."""

import importlib
import importlib.util

import pytest

# flash-attn module -> (fasttrain's module or modules, the names flash-attn exports there that fasttrain implements)
MIRRORED = {
    "flash_attn": (
        "fasttrain.ops",
        [
            "flash_attn_func",
            "flash_attn_kvpacked_func",
            "flash_attn_qkvpacked_func",
            "flash_attn_varlen_func",
            "flash_attn_varlen_kvpacked_func",
            "flash_attn_varlen_qkvpacked_func",
            "flash_attn_with_kvcache",
        ],
    ),
    "flash_attn.bert_padding": (
        "fasttrain.ops.bert_padding",
        [
            "IndexFirstAxis",
            "IndexFirstAxisResidual",
            "IndexPutFirstAxis",
            "index_first_axis",
            "index_first_axis_residual",
            "index_put_first_axis",
            "pad_input",
            "unpad_input",
            "unpad_input_for_concatenated_sequences",
        ],
    ),
    "flash_attn.layers.rotary": (
        "fasttrain.ops.rotary",
        [
            "RotaryEmbedding",
            "apply_rotary_emb",
            "apply_rotary_emb_func",
            "apply_rotary_emb_kv_",
            "apply_rotary_emb_qkv_",
            "apply_rotary_emb_torch",
            "rotate_half",
        ],
    ),
    "flash_attn.ops.triton.rotary": ("fasttrain.ops.rotary", ["apply_rotary"]),
    "flash_attn.losses.cross_entropy": ("fasttrain.ops.cross_entropy_loss", ["CrossEntropyLoss"]),
    "flash_attn.ops.triton.cross_entropy": ("fasttrain.ops.cross_entropy_loss", ["cross_entropy_loss"]),
    "flash_attn.ops.triton.layer_norm": (
        ("fasttrain.ops.dropout_add_norm", "fasttrain.ops.dropout_add_norm_reference"),
        ["RMSNorm", "layer_norm_fn", "layer_norm_linear_fn", "layer_norm_ref", "rms_norm_fn", "rms_norm_ref"],
    ),
}
MIRRORED["flash_attn.flash_attn_interface"] = MIRRORED["flash_attn"]


@pytest.mark.parametrize("module", sorted(MIRRORED))
def test_every_mirrored_name_is_fasttrains_own_object(module):
    sources, names = MIRRORED[module]
    mirror = importlib.import_module(f"fasttrain.{module}")
    own = [importlib.import_module(s) for s in ((sources,) if isinstance(sources, str) else sources)]
    for name in names:
        assert getattr(mirror, name) is next(getattr(m, name) for m in own if hasattr(m, name)), name
    assert sorted(mirror.__all__) == sorted(names)


def test_no_top_level_flash_attn_is_shipped():
    # A real flash-attn install must keep its name: fasttrain ships only fasttrain.flash_attn.
    spec = importlib.util.find_spec("flash_attn")
    assert spec is None or "fasttrain" not in (spec.origin or "")
