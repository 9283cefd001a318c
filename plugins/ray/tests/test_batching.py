"""How a replica batches a chat's chunks for the stream: the first alone and at once,
then up to 16 per item; an error rides on the last item. No cluster needed."""

from __future__ import annotations

import asyncio

from nexa.errors import ContextLengthExceeded
from nexa.types import ChatChunk
from nexa_ray.replica import BATCH_TOKENS, Outcome, _ChunkBuffer


async def collect(buffer: _ChunkBuffer) -> list:
    return [item async for item in buffer.batches()]


def test_a_burst_goes_out_in_full_batches_after_a_lone_first_chunk():
    async def run() -> list:
        buffer = _ChunkBuffer()
        reader = asyncio.ensure_future(collect(buffer))
        for i in range(40):
            buffer.put(ChatChunk(content=str(i)))
        buffer.close(Outcome())
        return await reader

    items = asyncio.run(run())
    sizes = [len(chunks) for chunks, _ in items]
    assert sizes[0] == 1 and all(n <= BATCH_TOKENS for n in sizes) and sum(sizes) == 40
    assert sizes == [1, 16, 16, 7]
    assert all(error is None for _, error in items)
    assert [c.content for chunks, _ in items for c in chunks] == [str(i) for i in range(40)]


def test_the_first_chunk_leaves_before_the_next_arrives():
    async def run() -> tuple[list, int]:
        buffer = _ChunkBuffer()
        batches = buffer.batches()
        buffer.put(ChatChunk(content="a"))
        first = await asyncio.wait_for(anext(batches), 5)  # no wait for a batch to fill
        for word in ("b", "c"):
            buffer.put(ChatChunk(content=word))
        buffer.close(Outcome(error=ContextLengthExceeded("too long")))
        rest = [item async for item in batches]
        return [first, *rest], len(buffer.items)

    items, left = asyncio.run(run())
    assert [[c.content for c in chunks] for chunks, _ in items] == [["a"], ["b", "c"]]
    assert items[0][1] is None and isinstance(items[-1][1], ContextLengthExceeded)
    assert left == 0


def test_an_error_before_any_chunk_is_one_item():
    async def run() -> list:
        buffer = _ChunkBuffer()
        buffer.close(Outcome(error=ValueError("bad")))
        return await collect(buffer)

    items = asyncio.run(run())
    assert len(items) == 1 and items[0][0] == () and isinstance(items[0][1], ValueError)
