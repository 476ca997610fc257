"""Small CPU-side parallelism: numpy/scipy/skimage work that releases the GIL, on a thread per core."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_threads(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, on up to one thread per core when there is more than one item.

    Worth it only where ``fn`` spends its time in code that releases the GIL (image resizing,
    FFTs, distance transforms); the order of the results is that of ``items``.
    """
    items = list(items)
    workers = min(len(items), os.cpu_count() or 1)
    if workers < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
