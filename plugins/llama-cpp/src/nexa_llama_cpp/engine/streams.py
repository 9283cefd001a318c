"""The consumer's side of one generation on the batching engine: its events, in order.

``Generation`` is for a blocking consumer (a worker thread), ``AsyncGeneration`` for an
event loop (the engine thread hands each event straight to the loop; no thread hop per
token). Both are submitted when made, so a bad request raises at once. Iterating yields
``TextPiece`` events and ends after the one ``Finished``. ``close()`` (or dropping the
stream, or the caller's cancel token) cancels the generation: the engine frees its
sequence at its next step and the consumer gets ``nexa.errors.Cancelled``. ``finish()``
ends it early as finished: the consumer has what it wants (it found a stop string).
``ready()`` returns the events that came with the last one (a guessed step's tokens arrive
together), so a consumer can send them on as one piece.
"""

from __future__ import annotations

import asyncio
import collections
import queue
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nexa.errors import Cancelled
from nexa_llama_cpp.engine.records import Control, Event, Finished, GenerationRequest

if TYPE_CHECKING:
    from nexa_llama_cpp.engine.scheduler import BatchEngine


class _Stream:
    def __init__(self, cancel: Any) -> None:
        self._control = Control(cancel)
        self._done = False
        self._buffer: collections.deque[Event | BaseException] = collections.deque()
        """Events received and not yet taken (the rest of the last batch)."""

    def finish(self) -> None:
        """End the generation now as finished (not cancelled); no more events come."""
        self._done = True
        self._control.finish()

    def close(self) -> None:
        """Cancel the generation (a no-op once it has finished)."""
        self._done = True
        self._control.close()

    def __del__(self) -> None:
        self._control.close()

    def _take(self, event: Event | BaseException) -> Event:
        if isinstance(event, BaseException):
            self.close()
            raise event
        if isinstance(event, Finished):
            self._done = True
        return event

    _events: Any
    """The subclass's queue of batches (``queue.SimpleQueue`` or ``asyncio.Queue``)."""
    _empty: type[Exception]
    """What its ``get_nowait`` raises when nothing has arrived."""

    def _more(self) -> Sequence[Event | BaseException] | None:
        """A batch that arrived already, without waiting; None when none has."""
        try:
            return self._events.get_nowait()
        except self._empty:
            return None

    def ready(self) -> list[Event]:
        """The events that arrived already, taken without waiting (an error stays for the
        next ``__next__``, which raises it)."""
        out: list[Event] = []
        while not self._done and not self._control.token_cancelled:
            if not self._buffer:
                batch = self._more()
                if batch is None:
                    break
                self._buffer.extend(batch)
                continue
            if isinstance(self._buffer[0], BaseException):
                break
            out.append(self._take(self._buffer.popleft()))
        return out


class Generation(_Stream):
    """A generation's events for a blocking consumer; ``cancel`` is checked at each event."""

    def __init__(self, engine: BatchEngine, request: GenerationRequest, cancel: Any = None) -> None:
        super().__init__(cancel)
        self._events: queue.SimpleQueue[Sequence[Event | BaseException]] = queue.SimpleQueue()
        self._empty = queue.Empty
        # Only the queue and the control are handed over, so a dropped stream is
        # collected (and cancelled in __del__) even while its generation runs.
        engine._submit(request, self._events.put, self._control)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        # Events the engine made before it saw the cancel are not delivered.
        if self._control.token_cancelled:
            self.close()
            raise Cancelled()
        if not self._buffer:
            self._buffer.extend(self._events.get())
        return self._take(self._buffer.popleft())


class AsyncGeneration(_Stream):
    """A generation's events for an event loop (made inside the loop that consumes it)."""

    def __init__(self, engine: BatchEngine, request: GenerationRequest, cancel: Any = None) -> None:
        super().__init__(cancel)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Sequence[Event | BaseException]] = asyncio.Queue()
        self._events = events
        self._empty = asyncio.QueueEmpty

        def sink(batch: Sequence[Event | BaseException]) -> None:
            # Raises RuntimeError once the loop is closed: the engine then drops the job.
            loop.call_soon_threadsafe(events.put_nowait, batch)

        engine._submit(request, sink, self._control)

    def __aiter__(self) -> AsyncGeneration:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        if self._control.token_cancelled:
            self.close()
            raise Cancelled()
        if not self._buffer:
            self._buffer.extend(await self._events.get())
        return self._take(self._buffer.popleft())

    async def aclose(self) -> None:
        self.close()
