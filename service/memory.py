"""The garbage collector of a long-running process, tuned once startup is done.

CPython's full collections walk every tracked object. In the gateway, startup leaves
~220 k of them (modules, the app, the clients) and a full pass took 30-110 ms with the
event loop stopped; under load, objects alive at a young collection (the requests in
flight) were promoted, died old, and piled up until a full pass took 200-900 ms: the
p99 of a JSON submit (docs/PERFORMANCE.md, round 8). So, once started: what startup
built is frozen out of the collector's sight (``gc.freeze``), and young collections run
every 50,000 allocations instead of 700, so that a request's garbage dies young.
"""

from __future__ import annotations

import gc

# Allocations between young collections, young collections per middle one, middle ones
# per full one (CPython's defaults: 700, 10, 10).
THRESHOLDS = (50_000, 20, 100)


def settle_after_startup() -> None:
    """Freeze what startup built and space the collector's passes (see the module)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
