import os

import torch

# Subprocesses (`python -m fasttrain...`, `python -c`) must import the installed fasttrain, like the tests do
# (--import-mode=importlib), not the source tree in the working directory, which has no _C and no fasttrain.kernels.
os.environ["PYTHONSAFEPATH"] = "1"

# Triton kernels run on the CPU through the interpreter; it must be on before any @triton.jit decorator runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
