"""Test-wide settings."""

import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels run in its interpreter on the CPU. Triton reads this when the
# kernels are first built, so it is set before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
