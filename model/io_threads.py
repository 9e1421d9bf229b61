"""Thread pools for the CPU work beside a GPU: decoding, pre- and postprocessing, writing.

Each pool thread runs its torch operations on one intra-op thread. Left at the default, every pool
thread that reaches a parallel torch kernel (normalising a 3 x 1024 x 1024 input, upsampling a mask)
starts an OpenMP team of its own as large as the machine: 16 pool threads on a 16-core GPU host
can make 256 threads, spinning for the same cores (not measured on a GPU host). Measured on the 2-core development CPU, two pool
threads preprocessing 1024-px BUSI images and upsampling their masks: 20.4-21.8 ms of CPU per image
with the default, 14.2-15.6 ms with one thread each (wall 10.8-11.5 against 7.5-8.3 ms per image).

``torch.set_num_threads`` sets the calling thread's OpenMP team size, but also the count that
threads starting later take when they first run a parallel kernel; so the thread that makes a pool
fixes its own count first, and keeps it.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def io_pool(threads: int, name: str) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads whose torch operations each run on one intra-op thread."""
    torch.get_num_threads()  # the calling thread takes its own intra-op thread count now
    return ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=_one_torch_thread)
