"""Batched linear solves that stay correct on multi-threaded CPUs: the one place the methods solve
``(E, m, m)`` systems (ridge heads, Newton steps of the dual logistic regression).

Why not ``torch.linalg.solve`` on a batch: on the CPU, PyTorch's batched LU factorisation hands batch
elements to several threads at once (its ``apply_lu_factor`` grain size is 0 for matrices larger than
about 14 x 14), and oneMKL's ``getrf`` is not safe to run concurrently for matrices of a few hundred
rows: with 2 threads a batch of 100 float64 251 x 251 systems (the 7-way 5-shot Newton systems of
``logreg``) prints hundreds of ``Intel oneMKL ERROR: Parameter 6 was incorrect on entry to DLASWP``
lines on stdout and fails with "Pivots given to lu_solve must all be greater or equal to 1", and at
200 x 200 it returns wrong solutions without a word (pytorch/pytorch#142815, fix proposed in
pytorch/pytorch#181570). One thread, or one matrix per call, avoids it.

The choice, measured on 100 float64 251 x 251 systems with 7 right-hand sides under
``torch.set_num_threads(2)`` on a loaded 2-core machine (best of 3): the old batched
``torch.linalg.solve`` failed after 0.94 s; the same batched LU on one intra-op thread took 1.24 s;
``cholesky_ex`` + ``cholesky_solve`` (which PyTorch runs one matrix after another, so without the race)
0.90 s on one thread and 4.11 s on two; a Python loop of single-matrix solves 6.12 s. The Newton
systems of the dual logistic regression are not symmetric, so Cholesky could serve only the ridge
systems and was not clearly faster; every caller therefore gets the batched LU on one thread
(``serial_batches``): the same LAPACK calls per matrix as before, so the solutions are bit for bit the
old ones wherever the old ones were right.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

_THREADS_LOCK = threading.Lock()


@contextmanager
def serial_batches() -> Iterator[None]:
    """Run the enclosed CPU linear algebra with one intra-op thread, so PyTorch factorises batch
    elements one after another (see the module docstring); the thread count is restored after. A lock
    keeps two Python threads from interleaving their save and restore."""
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        if threads > 1:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if threads > 1:
                torch.set_num_threads(threads)


def solve(a: Tensor, b: Tensor) -> Tensor:
    """``X`` with ``A X = B`` for ``(E, m, m)`` general ``a`` and ``(E, m, k)`` (or ``(E, m)``) ``b``,
    by LU with partial pivoting on one thread (raises on a singular system, like ``torch.linalg.solve``)."""
    with serial_batches():
        return torch.linalg.solve(a, b)
