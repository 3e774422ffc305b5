"""Shared pytest setup.

The test models are tiny: one intra-op thread is fastest, and with several threads a busy 2-core machine spends
most of its time in OpenMP spin-waits (measured: ~100x slower per forward under load).
"""

import torch

torch.set_num_threads(1)
