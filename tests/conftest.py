"""Test set-up shared by the whole suite.

Triton decides at decoration time whether kernels are interpreted, so TRITON_INTERPRET must be set
before any kernel module is imported: on a machine without CUDA the triton backend is tested on CPU
tensors through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
