"""fasttrain: kernel-accelerated training of transformer language models.

Drop-in pieces: ``fasttrain.optim.AdamW``, ``fasttrain.ops.flash_attn_func`` and friends. The trainer:
``fasttrain.train``; the command line: ``fasttrain train | eval | generate | bench | info``.
"""

__version__ = "0.1.0"
