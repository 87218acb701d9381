"""`silence.wedged` on synthetic thread figures: the GIL held (computing or blocked) is
a wedge however busy the machine is; threads waiting for a core are starvation, not a
wedge; without wait figures the CPU-share rules decide. The processes behind these
states are tested in test_frozen_workers."""

from __future__ import annotations

from serveflow.runtime.engine import ThreadTimes
from serveflow.runtime.silence import wedged

MAIN, BEAT, OTHER = 1, 2, 3
WINDOW_S = 0.75


def _times(cpu_s=0.0, waited_s=0.0, sleeps=0, asleep=True) -> ThreadTimes:
    return ThreadTimes(cpu_s=cpu_s, waited_s=waited_s, sleeps=sleeps, asleep=asleep)


def _start(waits: bool = True) -> dict[int, ThreadTimes]:
    return {t: _times(waited_s=0.0 if waits else None) for t in (MAIN, BEAT, OTHER)}


def test_a_thread_computing_without_sleeping_while_another_asks_for_the_gil_is_a_wedge():
    after = {
        MAIN: _times(cpu_s=0.09, waited_s=0.66, asleep=False),  # a busy machine: it waits too
        BEAT: _times(cpu_s=0.001, waited_s=0.3, sleeps=100),  # its GIL waits time out
        OTHER: _times(),
    }
    why = wedged(_start(), after, WINDOW_S)
    assert why is not None and "the GIL held" in why and f"thread {MAIN}" in why


def test_a_call_blocked_holding_the_gil_is_a_wedge():
    after = {MAIN: _times(), BEAT: _times(cpu_s=0.002, sleeps=120), OTHER: _times()}
    why = wedged(_start(), after, WINDOW_S)
    assert why is not None and "blocked" in why


def test_a_starved_heartbeat_thread_is_no_wedge_though_the_process_computes():
    after = {
        MAIN: _times(cpu_s=0.15, waited_s=0.5, asleep=False),  # Python, given a core at times
        BEAT: _times(waited_s=0.74, asleep=False),  # waits for a core throughout
        OTHER: _times(waited_s=0.74, asleep=False),
    }
    assert wedged(_start(), after, WINDOW_S) is None


def test_a_gil_holder_waiting_for_a_core_is_no_wedge():
    after = {
        MAIN: _times(cpu_s=0.01, waited_s=0.7, sleeps=1, asleep=False),  # hands it over
        BEAT: _times(cpu_s=0.002, waited_s=0.05, sleeps=60),  # asks for the GIL meanwhile
        OTHER: _times(),
    }
    assert wedged(_start(), after, WINDOW_S) is None


def test_without_wait_figures_the_cpu_share_rules_decide():
    computing = {MAIN: _times(cpu_s=0.5, waited_s=None, sleeps=3, asleep=False)}
    computing |= {t: _times(waited_s=None) for t in (BEAT, OTHER)}
    assert wedged(_start(waits=False), computing, WINDOW_S) == "0.50 s of CPU in 0.75 s"
    idle = {t: _times(waited_s=None, sleeps=2) for t in (MAIN, BEAT, OTHER)}
    assert "blocked" in (wedged(_start(waits=False), idle, WINDOW_S) or "")
    slow = {MAIN: _times(cpu_s=0.03, waited_s=None, asleep=False)}
    slow |= {t: _times(waited_s=None) for t in (BEAT, OTHER)}
    assert wedged(_start(waits=False), slow, WINDOW_S) is None
