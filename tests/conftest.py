"""Where there is no GPU, the GPU path's Triton kernels run in Triton's interpreter (tests/formats/test_gpu_kernels.py),
which must be chosen before anything imports Triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
