import os

import torch

# Triton kernels run on the CPU through the interpreter; it must be on before any @triton.jit decorator runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
