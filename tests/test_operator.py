"""The operator: keys through a real pseudo-terminal, and the scripted and replayed twins.

The terminal tests open a pty pair: the operator reads the slave end (what its stdin would be), the test types by
writing bytes to the master end. Every wait has a deadline.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import io
import os
import select
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from robot_rl.config import OperatorConfig, OperatorKeysConfig
from robot_rl.hardware.operator import (
    Operator,
    OperatorError,
    OperatorEvent,
    OperatorInput,
    ReplayedOperator,
    ScriptedOperator,
    TerminalOperator,
    make_operator,
)
from robot_rl.hardware.operator.keys import KeyDecoder

E = OperatorEvent
WAIT_S = 5.0  # generous: the machine is shared with training runs; a passing test never waits this long


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pty_pair() -> Iterator[tuple[int, int]]:
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        with contextlib.suppress(OSError):  # the master may be closed by the test already (hang-up)
            os.close(fd)


def pending_bytes(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def type_keys(master: int, slave: int, data: bytes) -> None:
    """Write `data` to the terminal and wait until all of it can be read from the slave (so one poll sees it all)."""
    before = pending_bytes(slave)
    os.write(master, data)
    deadline = time.monotonic() + WAIT_S
    while pending_bytes(slave) < before + len(data):
        assert time.monotonic() < deadline, f"the pty never delivered {data!r}"
        time.sleep(0.001)


def events(inputs: list[OperatorInput]) -> list[OperatorEvent]:
    return [i.event for i in inputs]


def lflag(fd: int) -> int:
    return termios.tcgetattr(fd)[3]


# --------------------------------------------------------------------------------------------------------------------
# TerminalOperator through a pty
# --------------------------------------------------------------------------------------------------------------------
def test_terminal_mode_is_set_inside_and_restored_after(pty_pair: tuple[int, int]) -> None:
    _, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert lflag(slave) & termios.ICANON and lflag(slave) & termios.ECHO
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    with TerminalOperator(OperatorKeysConfig(), stream=slave):
        inside = lflag(slave)
        assert not inside & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert signal.getsignal(signal.SIGTERM) != handlers[signal.SIGTERM]  # the restore hook is installed
    assert termios.tcgetattr(slave) == before
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_terminal_restored_after_an_exception_in_the_block(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    op = TerminalOperator(OperatorKeysConfig(), stream=slave)
    with pytest.raises(ZeroDivisionError), op:  # the caller's exception comes out unchanged
        assert termios.tcgetattr(slave) != before
        _ = 1 / 0
    assert termios.tcgetattr(slave) == before
    with op:  # usable again after exiting
        type_keys(master, slave, b"s")
        assert events(op.poll()) == [E.SUCCESS]
    assert termios.tcgetattr(slave) == before


def test_several_keys_in_one_read(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    clock = FakeClock(12.5)
    with TerminalOperator(OperatorKeysConfig(), stream=slave, clock=clock) as op:
        assert op.poll() == []  # nothing typed: nothing, at once
        type_keys(master, slave, b"sfs")
        got = op.poll()
        assert got == [
            OperatorInput(E.SUCCESS, 12.5, "s"),
            OperatorInput(E.FAILURE, 12.5, "f"),
            OperatorInput(E.SUCCESS, 12.5, "s"),
        ]
        assert op.poll() == []  # each key is reported once


def test_pause_toggles_between_pause_and_resume(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    with TerminalOperator(OperatorKeysConfig(pause="x"), stream=slave) as op:
        assert not op.paused
        type_keys(master, slave, b"x")
        assert events(op.poll()) == [E.PAUSE]
        assert op.paused and op.hint().startswith("PAUSED")
        type_keys(master, slave, b"x")
        assert events(op.poll()) == [E.RESUME]
        assert not op.paused
        type_keys(master, slave, b"xx")
        assert events(op.poll()) == [E.PAUSE, E.RESUME]


def test_unknown_keys_and_escape_sequences_are_ignored(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    # "A" is bound, so the arrow key "up" (ESC [ A), its SS3 form (ESC O A), Ctrl+up (ESC [ 1;5 A) and Alt+A
    # (ESC A) all end in the byte of a bound key and must still not press it.
    keys = OperatorKeysConfig(success="A")
    with TerminalOperator(keys, stream=slave) as op:
        type_keys(master, slave, b"xyz1\n\t \x1b[A\x1bOA\x1b[1;5A\x1bA\x04")
        assert op.poll() == []
        type_keys(master, slave, b"zA")
        got = op.poll()
        assert events(got) == [E.SUCCESS] and got[0].key == "A"


def test_other_case_works_when_unbound(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    with TerminalOperator(OperatorKeysConfig(success="s", failure="S"), stream=slave) as op:
        # Caps Lock on: P still pauses; S is bound to failure itself; F is nobody's (failure is "S", not "f").
        type_keys(master, slave, b"SsPF")
        assert events(op.poll()) == [E.FAILURE, E.SUCCESS, E.PAUSE]


def test_quit_needs_a_second_press_in_time(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    clock = FakeClock(100.0)
    with TerminalOperator(OperatorKeysConfig(), stream=slave, clock=clock, quit_confirm_s=3.0) as op:
        assert op.hint() == "[s]uccess [f]ail/reset [p]ause [q]uit"
        type_keys(master, slave, b"q")
        assert op.poll() == []  # the first press only asks
        assert op.hint() == "press q again to quit"
        clock.now = 102.9
        type_keys(master, slave, b"q")
        assert op.poll() == [OperatorInput(E.QUIT, 102.9, "q")]
        assert "again" not in op.hint()

        # Too late: the second press arms the question again instead of quitting.
        type_keys(master, slave, b"q")
        assert op.poll() == []
        clock.now = 106.0
        assert "again" not in op.hint()  # the question expired
        type_keys(master, slave, b"q")
        assert op.poll() == []
        assert op.hint() == "press q again to quit"
        clock.now = 107.0
        type_keys(master, slave, b"q")
        assert events(op.poll()) == [E.QUIT]


def test_ctrl_c_quits_at_once(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    # With ISIG left on, the line discipline would eat \x03 (turning it into SIGINT) and this poll would be empty.
    with TerminalOperator(OperatorKeysConfig(), stream=slave) as op:
        type_keys(master, slave, b"\x03")
        assert [(i.event, i.key) for i in op.poll()] == [(E.QUIT, "^C")]


def test_keys_typed_before_enter_are_discarded(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    type_keys(master, slave, b"s\n")  # typed during start-up, still in the terminal's buffer
    with TerminalOperator(OperatorKeysConfig(), stream=slave) as op:
        assert op.poll() == []
        type_keys(master, slave, b"f")
        assert events(op.poll()) == [E.FAILURE]


def test_hang_up_means_quit(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    with TerminalOperator(OperatorKeysConfig(), stream=slave) as op:
        type_keys(master, slave, b"s")
        assert events(op.poll()) == [E.SUCCESS]
        os.close(master)  # the SSH session dropped
        deadline = time.monotonic() + WAIT_S
        got: list[OperatorInput] = []
        while not got:
            assert time.monotonic() < deadline, "no QUIT after hang-up"
            got = op.poll()
        assert got == [OperatorInput(E.QUIT, got[0].time_s, None)]
        assert op.poll() == []  # once


def test_poll_outside_the_with_block_is_refused(pty_pair: tuple[int, int]) -> None:
    _, slave = pty_pair
    op = TerminalOperator(OperatorKeysConfig(), stream=slave)
    with pytest.raises(RuntimeError, match="with"):
        op.poll()
    with op, pytest.raises(RuntimeError, match="twice"), op:
        pass


def test_non_tty_is_refused_unless_allowed() -> None:
    read_end, write_end = os.pipe()
    try:
        with open(os.devnull) as devnull:
            for stream in (devnull, read_end, io.StringIO("s")):
                with pytest.raises(OperatorError, match="need a terminal"):
                    TerminalOperator(OperatorKeysConfig(), stream=stream)
            os.write(write_end, b"sss")
            with TerminalOperator(OperatorKeysConfig(), stream=read_end, allow_no_tty=True) as op:
                assert not op.is_tty
                assert op.poll() == []  # the pipe holds "sss"; an inert operator reads nothing
                assert "not a terminal" in op.hint()
    finally:
        os.close(read_end)
        os.close(write_end)


def test_bad_quit_confirmation_time_is_refused(pty_pair: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="quit_confirm_s"):
        TerminalOperator(OperatorKeysConfig(), stream=pty_pair[1], quit_confirm_s=float("nan"))


def test_hint_names_custom_keys(pty_pair: tuple[int, int]) -> None:
    op = TerminalOperator(OperatorKeysConfig(success="y", failure="n", pause="p", quit="x"), stream=pty_pair[1])
    assert op.hint() == "[y] success [n] fail/reset [p]ause [x] quit"


def test_decoder_joins_split_input_and_forgets_a_lone_escape() -> None:
    d = KeyDecoder()
    assert d.feed(b"\xc3", 0.0) == [] and d.feed(b"\xbc", 0.0) == ["ü"]  # one UTF-8 character in two reads
    assert d.feed(b"\x1b[", 1.0) == [] and d.feed(b"1;5A", 1.01) == []  # one escape sequence in two reads
    assert d.feed(b"\x1b", 2.0) == [] and d.feed(b"s", 3.0) == ["s"]  # ESC pressed alone, "s" a second later
    for after in (b"\x1b", b"\x1bO", b"\x1b[1;"):  # Ctrl-C is never swallowed, whatever came before it
        assert d.feed(after + b"\x03", 4.0) == ["\x03"]


# A child process whose real stdin is the pty slave: the default `stream` and the signal restore path.
CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from robot_rl.config import OperatorKeysConfig
    from robot_rl.hardware.operator import OperatorEvent, TerminalOperator

    for signum in (signal.SIGTERM, signal.SIGHUP):  # as in a login shell, even if the test runs under nohup
        signal.signal(signum, signal.SIG_DFL)

    with TerminalOperator(OperatorKeysConfig()) as op:
        print("ready", flush=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for i in op.poll():
                print(i.event.name, flush=True)
                if i.event is OperatorEvent.QUIT:
                    sys.exit(0)
            time.sleep(0.005)
    sys.exit(3)
    """
)


def read_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
    assert ready, "the child printed nothing in time"
    return proc.stdout.readline().strip()


@pytest.fixture
def child(pty_pair: tuple[int, int]) -> Iterator[tuple[subprocess.Popen[str], int, int, list[Any]]]:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)  # read before the child starts: it may switch the terminal at once
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=slave,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # no controlling terminal of ours: no SIGTTOU, no stray signals
    )
    try:
        yield proc, master, slave, before
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_S)
        assert proc.stdout is not None
        proc.stdout.close()


def test_child_reads_its_real_stdin_and_restores_it(child: tuple[subprocess.Popen[str], int, int, list[Any]]) -> None:
    proc, master, slave, before = child
    assert read_line(proc) == "ready"
    assert not lflag(slave) & termios.ICANON  # the child switched its stdin, the same terminal
    os.write(master, b"zs")
    assert read_line(proc) == "SUCCESS"
    os.write(master, b"q")
    os.write(master, b"q")
    assert read_line(proc) == "QUIT"
    assert proc.wait(timeout=WAIT_S) == 0
    assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_restores_the_terminal(child: tuple[subprocess.Popen[str], int, int, list[Any]], signum: int) -> None:
    proc, _, slave, before = child
    assert read_line(proc) == "ready"
    assert termios.tcgetattr(slave) != before
    proc.send_signal(signum)
    assert proc.wait(timeout=WAIT_S) == -signum  # still killed by the signal, as without the hook
    assert termios.tcgetattr(slave) == before


# --------------------------------------------------------------------------------------------------------------------
# ScriptedOperator
# --------------------------------------------------------------------------------------------------------------------
def test_scripted_reports_each_success_once() -> None:
    clock = FakeClock(5.0)
    op = ScriptedOperator(clock=clock)
    assert isinstance(op, Operator)
    with op:
        got: list[list[OperatorEvent]] = []
        for success in (False, False, True, True, False, True):
            op.observe({"is_success": success, "insertion_depth_m": 0.0})
            got.append(events(op.poll()))
        assert got == [[], [], [E.SUCCESS], [], [], [E.SUCCESS]]
        assert op.step == 6 and not op.paused

        # A new episode whose first step already succeeds (the previous one ended in success): reported again.
        op.new_episode()
        op.observe({"is_success": True})
        assert op.poll() == [OperatorInput(E.SUCCESS, 5.0)]


def test_scripted_events_fire_at_their_steps() -> None:
    op = ScriptedOperator(events={2: E.PAUSE, 4: E.RESUME, 5: E.FAILURE})
    timeline = []
    for _ in range(6):
        op.observe({"is_success": False})
        timeline.append((op.step, events(op.poll()), op.paused))
    assert timeline == [
        (1, [], False),
        (2, [E.PAUSE], True),
        (3, [], True),
        (4, [E.RESUME], False),
        (5, [E.FAILURE], False),
        (6, [], False),
    ]


def test_scripted_needs_the_success_flag() -> None:
    op = ScriptedOperator()
    with pytest.raises(KeyError, match="is_success"):
        op.observe({"insertion_depth_m": 0.0})
    assert op.step == 0


# --------------------------------------------------------------------------------------------------------------------
# ReplayedOperator
# --------------------------------------------------------------------------------------------------------------------
def test_replay_releases_events_at_their_steps() -> None:
    log = [(7, E.QUIT), (0, E.PAUSE), (3, E.SUCCESS), (1, E.RESUME), (3, E.FAILURE)]  # unsorted on purpose
    op = ReplayedOperator(log)
    assert isinstance(op, Operator)
    with op:
        assert events(op.poll()) == [E.PAUSE] and op.paused
        op.advance(2)
        assert events(op.poll()) == [E.RESUME] and not op.paused
        op.advance(3)
        assert events(op.poll()) == [E.SUCCESS, E.FAILURE]  # same step: logged order kept
        assert op.poll() == [] and op.remaining == 1
        op.advance(6)
        assert op.poll() == []
        op.advance(20)
        assert events(op.poll()) == [E.QUIT] and op.remaining == 0
        with pytest.raises(ValueError, match="before"):
            op.advance(19)


@pytest.mark.parametrize("bad", [[(-1, E.QUIT)], [(1, "quit")], [(True, E.QUIT)], [(1.5, E.QUIT)], [(1,)]])
def test_replay_refuses_malformed_logs(bad: list[tuple[object, ...]]) -> None:
    with pytest.raises(ValueError, match="operator event"):
        ReplayedOperator(bad)  # type: ignore[arg-type]


def test_replay_reproduces_a_scripted_run() -> None:
    scripted = ScriptedOperator(events={3: E.PAUSE, 5: E.RESUME})
    successes = [False, False, True, False, False, False, True, True]
    logged: list[tuple[int, OperatorEvent]] = []
    for s in successes:  # what the actor does: step, observe, poll, log with its step counter
        scripted.observe({"is_success": s})
        logged += [(scripted.step, i.event) for i in scripted.poll()]

    replayed = ReplayedOperator(logged)
    seen: list[tuple[int, OperatorEvent]] = []
    for step in range(1, len(successes) + 1):
        replayed.advance(step)
        seen += [(step, i.event) for i in replayed.poll()]
    assert seen == logged == [(3, E.SUCCESS), (3, E.PAUSE), (5, E.RESUME), (7, E.SUCCESS)]


# --------------------------------------------------------------------------------------------------------------------
# make_operator
# --------------------------------------------------------------------------------------------------------------------
def test_factory_builds_what_the_config_asks(pty_pair: tuple[int, int]) -> None:
    master, slave = pty_pair
    assert isinstance(make_operator(OperatorConfig()), ScriptedOperator)
    assert isinstance(make_operator(OperatorConfig(kind="replay"), events=[(1, E.QUIT)]), ReplayedOperator)

    cfg = OperatorConfig(kind="keys", keys=OperatorKeysConfig(success="y"))
    op = make_operator(cfg, stream=slave)
    assert isinstance(op, TerminalOperator)
    with op:
        type_keys(master, slave, b"sy")
        assert events(op.poll()) == [E.SUCCESS]  # the configured key, not the default
    inert = make_operator(cfg, stream=io.StringIO(), allow_no_tty=True)
    assert isinstance(inert, TerminalOperator) and not inert.is_tty


def test_factory_refuses_options_that_cannot_apply(pty_pair: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="needs the logged events"):
        make_operator(OperatorConfig(kind="replay"))
    with pytest.raises(ValueError, match="keyboard"):
        make_operator(OperatorConfig(kind="keys"), stream=pty_pair[1], events=[(1, E.QUIT)])
    with pytest.raises(ValueError, match="stream"):
        make_operator(OperatorConfig(kind="scripted"), stream=pty_pair[1])
    with pytest.raises(OperatorError):
        make_operator(OperatorConfig(kind="keys"), stream=io.StringIO())
