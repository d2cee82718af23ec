"""Process-wide tuning for the long-running processes: `newsletter serve` and `worker`.

The garbage collector is the concern. After start-up a process holds some 140,000 objects
that live as long as it does (modules, routes, models, SQLAlchemy's compiled statements).
CPython's full collection walks all of them, and under load it runs every second or so:
requests in flight outlive the young generations and are promoted, then die old. Measured
on `newsletter serve` at 32 clients, full collections took up to 105 ms each and 4 s in
a 40 s run; they were the long tail of every route, `/healthz` included (p99 ~100 ms).

`settle()`, called once the process is set up, moves what exists then out of the
collector's sight (`gc.freeze`): a full collection then walks only what came later, a few
milliseconds. A larger first threshold lets most of a request's objects die young.
Frozen objects are never collected, so this is for the process's own start-up state only,
not for code that builds and drops apps repeatedly (the tests).
"""

from __future__ import annotations

import gc

# Objects allocated (minus freed) between two young collections: CPython's default, 700,
# promotes the objects of every request in flight under load.
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Freeze the start-up heap and widen the young generation; call once per process."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
