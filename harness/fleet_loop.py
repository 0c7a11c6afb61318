"""The fleet's event loop: the virtual-time loop of :mod:`harness.clock`, without a system
call per turn.

:class:`harness.clock.VirtualTimeLoop` polls its selector (a ``select`` on its wake-up pipe)
at every turn of the loop; the fleet has no file descriptors to watch (no sockets, no
threads handing it work), so :class:`FleetLoop` only moves the clock: the same callbacks
run in the same order at the same virtual times.
"""

from __future__ import annotations

import selectors

from harness.clock import VirtualTimeLoop, _cancel_all


class _ClockOnlySelector(selectors.SelectSelector):
    """Never polls: a turn with nothing ready moves the loop's clock to its next timer."""

    def __init__(self):
        super().__init__()
        self.loop: "FleetLoop | None" = None

    def select(self, timeout=None):
        if timeout == 0:
            return []
        if timeout is None:
            raise RuntimeError("virtual-time deadlock: every task waits and no timer is pending "
                               "(a policy awaits a message that will never come)")
        self.loop._now += timeout
        return []


class FleetLoop(VirtualTimeLoop):
    """A virtual-time loop whose turns make no system call (see the module docstring)."""

    def __init__(self):
        super().__init__()
        selector = _ClockOnlySelector()
        selector.loop = self
        old, self._selector = self._selector, selector
        old.close()


def run_virtual(coro):
    """Run a coroutine to completion on a :class:`FleetLoop`."""
    loop = FleetLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        _cancel_all(loop)
        loop.close()
