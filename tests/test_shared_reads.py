"""Identical reads at the same moment share one (service/live.py: SharedReads)."""

from __future__ import annotations

import asyncio

from service.live import SharedReads


def test_a_thousand_waiters_of_one_read_run_it_once_and_one_leaving_cancels_nothing() -> None:
    reads = SharedReads()
    calls: list[str] = []

    async def read(key: str) -> str:
        calls.append(key)
        await asyncio.sleep(0.05)
        return f"events after {key}"

    async def main() -> tuple[list[str], str]:
        waiters = [asyncio.create_task(reads.get("a", lambda: read("a"))) for _ in range(1000)]
        await asyncio.sleep(0.01)
        waiters[0].cancel()  # a client left: the read goes on for the others
        results = await asyncio.gather(*waiters[1:])
        later = await reads.get("a", lambda: read("a"))  # a new moment: read again
        return results, later

    results, later = asyncio.run(main())
    assert set(results) == {"events after a"} and len(results) == 999
    assert later == "events after a"
    assert calls == ["a", "a"]
    assert reads.shared == 999
