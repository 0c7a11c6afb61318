"""Clocks for policies: the wall clock, and an event loop whose time jumps (virtual time).

In virtual time the event loop never sleeps: when every task is waiting on a timer it
advances its clock to the earliest timer and runs it. Model work is executed for real (the
tokens are real) but costs no virtual time except what a device profile charges.
"""

from __future__ import annotations

import asyncio
import selectors


class _JumpingSelector(selectors.SelectSelector):
    """Polls without blocking; instead of waiting for a timer, moves the loop's clock."""

    def __init__(self):
        super().__init__()
        self.loop: "VirtualTimeLoop | None" = None

    def select(self, timeout=None):
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError(
                "virtual-time deadlock: every task waits and no timer is pending "
                "(a policy awaits a message that will never come)"
            )
        self.loop._now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on virtual time: ``loop.time()`` starts at 0 and jumps to timers."""

    def __init__(self):
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 0.0
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._now


class LoopClock:
    """The clock a policy sees: the running loop's time (virtual or monotonic wall time)."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


def run(coro, virtual: bool):
    """Run a coroutine to completion on a virtual-time or an ordinary event loop."""
    if not virtual:
        return asyncio.run(coro)
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        _cancel_all(loop)
        loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left (after an error) so no task outlives its loop."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
