"""Adapters that put fasttrain's ops inside other libraries: `fasttrain.integrations.hf` for HF Transformers."""
