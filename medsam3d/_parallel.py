"""Small CPU-side parallelism: numpy/scipy/skimage work that releases the GIL, on a thread per core.

The number of threads can be capped for the whole process (a server or a Ray worker that
shares its cores): :func:`medsam3d.models.set_threads` sets the cap read here, by torch and
by the ONNX Runtime sessions built after it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_cap: int | None = None


def set_thread_cap(n: int | None) -> None:
    """Cap the threads of :func:`map_threads` (and of what reads :func:`thread_cap`); None: no cap."""
    global _cap
    _cap = n


def thread_cap() -> int | None:
    """The process-wide thread cap, or None when the cores decide."""
    return _cap


def map_threads(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, on up to one thread per core (or the cap) when there is more than one item.

    Worth it only where ``fn`` spends its time in code that releases the GIL (image resizing,
    FFTs, distance transforms); the order of the results is that of ``items``.
    """
    items = list(items)
    workers = min(len(items), _cap or os.cpu_count() or 1)
    if workers < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
