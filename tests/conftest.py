"""Shared pytest set-up: import from the repository root, and run Triton kernels in the
interpreter when there is no GPU (TRITON_INTERPRET must be set before triton is imported)."""

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
