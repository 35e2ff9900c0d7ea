"""Without a GPU, Triton kernels run under Triton's CPU interpreter in the tests; the switch must be set before
Triton is first imported (its own jit'd helpers are built at import), hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
