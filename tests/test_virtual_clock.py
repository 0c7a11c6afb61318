"""The virtual-time loops (harness/clock.py, harness/fleet_loop.py): time jumps to the next
timer, and a run in which every task waits with no timer left is an error that says so."""

from __future__ import annotations

import asyncio

import pytest

from harness.clock import LoopClock, run
from harness.fleet_loop import run_virtual

DEADLOCK = ("virtual-time deadlock: every task waits and no timer is pending "
            "(a policy awaits a message that will never come)")
LOOPS = {"virtual": lambda coro: run(coro, virtual=True), "fleet": run_virtual}


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_time_jumps_from_timer_to_timer(loop):
    clock, seen = LoopClock(), []

    async def sleeper(name, seconds):
        await clock.sleep(seconds)
        seen.append((name, clock.now()))

    async def main():
        await asyncio.gather(sleeper("b", 2.5), sleeper("a", 0.75), sleeper("c", 3600.0))
        return clock.now()

    assert LOOPS[loop](main()) == 3600.0
    assert seen == [("a", 0.75), ("b", 2.5), ("c", 3600.0)]


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_wait_that_nothing_can_end_is_a_deadlock_named_as_such(loop):
    async def main():
        await asyncio.sleep(1.0)
        await asyncio.get_running_loop().create_future()  # nobody will ever set it

    with pytest.raises(RuntimeError) as err:
        LOOPS[loop](main())
    assert str(err.value) == DEADLOCK


def test_run_uses_virtual_time_or_the_wall_clock_as_asked():
    clock = LoopClock()

    async def main():
        t0 = clock.now()
        await clock.sleep(0.02)
        return clock.now() - t0

    assert run(main(), virtual=True) == 0.02  # the clock jumped, exactly
    assert run(main(), virtual=False) >= 0.02  # the wall clock's loop waited
