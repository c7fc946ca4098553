"""Built-in workloads for `discache simulate`, as trace operations."""
from __future__ import annotations

import random
from itertools import accumulate
from typing import Iterator

from .replay import Op


def image_cache(images: int = 384, image_pages: int = 256, steps: int = 3000,
                pressure_every: int = 100, pressure_pages: int = 4096, peek_every: int = 8,
                seed: int = 1) -> Iterator[Op]:
    """An image cache that keeps decoded images volatile while idle.

    Each step the app picks an image (Zipf-like popularity), locks it (decoding it again if it
    was purged, or on first use), reads it, and unlocks it.  Every `peek_every` steps it reads
    the first page of another idle image without locking it (an optimistic thumbnail peek, the
    access where SIGBUS and zero-fill differ).  Every `pressure_every` steps the system asks for
    `pressure_pages` pages back (periodic memory pressure); the cache's total size may also
    exceed RAM, which causes direct reclaim."""
    rng = random.Random(seed)
    cumulative = list(accumulate(1.0 / (rank + 1) ** 0.9 for rank in range(images)))
    decoded: list[int] = []
    known: set[int] = set()
    yield ("spawn", "app")
    for step in range(1, steps + 1):
        i = rng.choices(range(images), cum_weights=cumulative)[0]
        name = f"img{i}"
        if i not in known:
            known.add(i)
            decoded.append(i)
            yield ("mmap", "app", name, image_pages)
            yield ("write", "app", name, 0, image_pages)
        else:
            yield ("lock", "app", name, 0, image_pages)
        yield ("read", "app", name, 0, image_pages)
        yield ("unlock", "app", name, 0, image_pages)
        if peek_every and step % peek_every == 0 and len(decoded) > 1:
            j = decoded[rng.randrange(len(decoded))]
            if j != i:
                yield ("read", "app", f"img{j}", 0, 1)
        if pressure_every and step % pressure_every == 0:
            yield ("reclaim", pressure_pages)
