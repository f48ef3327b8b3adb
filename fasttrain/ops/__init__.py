"""Public ops: flash-attn- and torch-compatible signatures over the kernels, with a pure-PyTorch reference beside each."""
