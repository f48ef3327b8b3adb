import os

import pytest
import torch

# Subprocesses (`python -m fasttrain...`, `python -c`) must import the installed fasttrain, like the tests do
# (--import-mode=importlib), not the source tree in the working directory, which has no _C and no fasttrain.kernels.
os.environ["PYTHONSAFEPATH"] = "1"

# Triton kernels run on the CPU through the interpreter; it must be on before any @triton.jit decorator runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def cpu_user(monkeypatch):
    """The trainer, the CLI and generation as a user of a CPU runs them, in this process and in the subprocesses
    it starts: no Triton interpreter, so backend="auto" takes the C++ CPU kernels and the references (it reads
    TRITON_INTERPRET at each call; the interpreted Triton kernels have their own tests, and tests/test_convergence.py
    trains with them). And one intra-op thread: the tests' models are too small for a second one to pay, and on a
    busy machine (or beside a pytest-xdist worker) a second thread spins waiting for a core."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
