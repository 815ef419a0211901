"""`TerminalOperator`: a person at the actor's terminal presses single keys; works over SSH with no X server.

The terminal is switched to cbreak mode with signals off (no line buffering, no echo, Ctrl-C arrives as a byte) on
enter and always switched back on exit, after an exception, at interpreter exit, and on SIGTERM/SIGHUP. Reading is
`select` with a zero timeout and then `os.read`: the control loop never waits for a key. We deliberately do not set
O_NONBLOCK: that flag belongs to the open file description, which the login shell shares, and a crash before it is
cleared would leave the shell's stdin broken.

Ctrl-C quits at once, through the actor's normal shutdown (stop the robot, flush the logs) instead of a
KeyboardInterrupt raised at an arbitrary line. The quit key asks once more: a single stray press must not end a run.
"""

from __future__ import annotations

import atexit
import codecs
import enum
import errno
import math
import os
import select
import signal
import sys
import termios
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Protocol, Self

from robot_rl.config import OperatorKeysConfig
from robot_rl.hardware.operator.events import OperatorError, OperatorEvent, OperatorInput

QUIT_CONFIRM_S = 3.0
"""The second press of the quit key must come within this many seconds of the first."""
CTRL_C = "\x03"
ESC_TIMEOUT_S = 0.1
"""An escape sequence (arrow keys, F-keys) arrives in one burst; a lone ESC older than this is forgotten (vim's
ttimeoutlen default), so the key pressed after it is not swallowed."""
_READ_SIZE = 1024
_MAX_READS_PER_POLL = 8  # bounds the time one poll can take even if someone pastes a novel into the terminal
# SIGHUP: the SSH session dropped; SIGTERM: someone stopped the actor. SIGINT cannot come from the keyboard (ISIG off).
_RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class _Escape(enum.Enum):
    NONE = enum.auto()
    ESC = enum.auto()  # saw ESC
    CSI = enum.auto()  # saw ESC [ : parameters until a final byte
    SS3 = enum.auto()  # saw ESC O : one more character


class KeyDecoder:
    """Bytes from the terminal -> the characters the person typed, without the parts of escape sequences.

    Without this, the arrow key "up" (ESC [ A) would press the key "A". UTF-8 characters split across two reads are
    joined; undecodable bytes become U+FFFD, which no binding matches.
    """

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._state = _Escape.NONE
        self._since = 0.0

    def feed(self, data: bytes, now: float) -> list[str]:
        if self._state is not _Escape.NONE and now - self._since > ESC_TIMEOUT_S:
            self._state = _Escape.NONE
        keys: list[str] = []
        for ch in self._utf8.decode(data):
            if self._accept(ch, now):
                keys.append(ch)
        return keys

    def _accept(self, ch: str, now: float) -> bool:
        """Advance the escape-sequence state by one character; True when `ch` is a key press of its own."""
        state = self._state
        if ch == CTRL_C:
            self._state = _Escape.NONE
            return True  # never swallowed, whatever came before it
        if state is _Escape.NONE:
            if ch == "\x1b":
                self._state, self._since = _Escape.ESC, now
                return False
            return True
        if state is _Escape.ESC:
            self._state = {"[": _Escape.CSI, "O": _Escape.SS3, "\x1b": _Escape.ESC}.get(ch, _Escape.NONE)
            return False  # ESC x is Alt+x: not the key x
        if state is _Escape.CSI and "\x20" <= ch <= "\x3f":
            return False  # parameter or intermediate byte
        self._state = _Escape.NONE
        if state is _Escape.CSI and not "\x40" <= ch <= "\x7e":
            return self._accept(ch, now)  # a malformed sequence: the character is not part of it
        return False  # the final byte of CSI, or the character after SS3


def _bindings(keys: OperatorKeysConfig) -> dict[str, OperatorEvent]:
    """Key -> event; PAUSE stands for the pause toggle. The other case of each key works too (Caps Lock on) unless
    it is bound to something else."""
    exact = {
        keys.success: OperatorEvent.SUCCESS,
        keys.failure: OperatorEvent.FAILURE,
        keys.pause: OperatorEvent.PAUSE,
        keys.quit: OperatorEvent.QUIT,
    }
    bindings = dict(exact)
    for key, event in exact.items():
        other = key.swapcase()
        if len(other) == 1:  # "ß".swapcase() is "SS"
            bindings.setdefault(other, event)
    return bindings


def _tty_fd(stream: HasFileno | int) -> tuple[int | None, str]:
    """The file descriptor when `stream` is a terminal, else None and why not."""
    try:
        fd = stream if isinstance(stream, int) else stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: replaced or captured stdin
        return None, f"{stream!r} has no file descriptor"
    if not os.isatty(fd):
        return None, f"file descriptor {fd} ({stream!r}) is not a terminal"
    return fd, ""


def _cbreak_without_signals(attrs: list[Any]) -> list[Any]:
    """Termios attributes for reading single keys: no line buffering, no echo, Ctrl-C as a byte.

    Output processing (OPOST) stays on so the actor's status line and prints still get their carriage returns.
    """
    new = [*attrs[:6], list(attrs[6])]
    new[3] &= ~(termios.ECHO | termios.ICANON | termios.ISIG)
    new[6][termios.VMIN] = 1  # a read after select() returns what is there; 0 bytes only on hang-up
    new[6][termios.VTIME] = 0
    return new


class TerminalOperator:
    """Operator keys read from a terminal (stdin by default); see the module docstring.

    Use it as a context manager around the actor loop and call `poll()` once per step. `stream` is anything with a
    `fileno()` or a file descriptor; None means `sys.stdin` as it is when the operator is built. When the stream is
    not a terminal (CI, a pipe, /dev/null, `ssh host cmd` without `-t`) construction fails with `OperatorError`,
    unless `allow_no_tty=True`: then the operator is inert and `poll()` returns nothing.
    """

    def __init__(
        self,
        keys: OperatorKeysConfig,
        *,
        stream: HasFileno | int | None = None,
        allow_no_tty: bool = False,
        clock: Callable[[], float] = time.monotonic,
        quit_confirm_s: float = QUIT_CONFIRM_S,
    ) -> None:
        if not (math.isfinite(quit_confirm_s) and quit_confirm_s > 0):
            raise ValueError(f"quit_confirm_s must be a positive number of seconds, got {quit_confirm_s}")
        self._fd, why = _tty_fd(sys.stdin if stream is None else stream)
        if self._fd is None and not allow_no_tty:
            raise OperatorError(
                f"operator keys need a terminal, but {why} (CI, a pipe, /dev/null?). Run the actor in a terminal "
                "(`ssh -t` for a remote command), use operator.kind=scripted in simulation, or pass "
                "allow_no_tty=True to run without operator keys."
            )
        self.keys = keys
        self._bindings = _bindings(keys)
        self._clock = clock
        self._quit_confirm_s = quit_confirm_s
        self._decoder = KeyDecoder()
        self._saved: list[Any] | None = None  # the attributes to put back; None when the terminal is not ours
        self._previous_handlers: dict[int, Any] = {}
        self._entered = False
        self._hung_up = False
        self._paused = False
        self._quit_armed_at: float | None = None

    @property
    def is_tty(self) -> bool:
        """False for an inert operator (no terminal, `allow_no_tty=True`)."""
        return self._fd is not None

    @property
    def paused(self) -> bool:
        return self._paused

    # ---------------------------------------------------------------------------------------------------------------
    # Terminal mode
    # ---------------------------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._entered:
            raise RuntimeError("TerminalOperator is already in use (entered twice)")
        self._entered = True
        if self._fd is None:
            return self
        self._saved = termios.tcgetattr(self._fd)
        self._install_restore_hooks()  # before the mode changes, so no window leaves the terminal broken
        try:
            termios.tcsetattr(self._fd, termios.TCSANOW, _cbreak_without_signals(self._saved))
            # Keys typed while the actor was starting up are stale: a "s" pressed during start-up must not end the
            # first episode as a success.
            termios.tcflush(self._fd, termios.TCIFLUSH)
        except BaseException:
            self._leave()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._leave()  # never raises: the caller's exception, if any, is the one that matters

    def _leave(self) -> None:
        self._restore()
        self._remove_restore_hooks()
        self._entered = False

    def _restore(self) -> None:
        """Put the saved attributes back; idempotent, and safe to call from a signal handler or at exit."""
        saved, self._saved = self._saved, None
        if saved is None or self._fd is None:
            return
        try:
            # TCSANOW, not TCSADRAIN: never wait on output here (a stuck SSH connection would hang the exit). Unread
            # keys are discarded so they do not turn into shell input.
            termios.tcsetattr(self._fd, termios.TCSANOW, saved)
            termios.tcflush(self._fd, termios.TCIFLUSH)
        except termios.error:
            pass  # the terminal is gone (hang-up): there is nothing left to restore

    def _install_restore_hooks(self) -> None:
        atexit.register(self._restore)
        if threading.current_thread() is not threading.main_thread():
            return  # Python handles signals only in the main thread; atexit and __exit__ still restore
        for signum in _RESTORE_SIGNALS:
            previous = signal.getsignal(signum)
            # Chain only to what we can reproduce: the default action or a Python handler. An ignored signal stays
            # ignored (restoring the terminal then would break the keys while the process runs on).
            if previous is signal.SIG_DFL or callable(previous):
                self._previous_handlers[signum] = previous
                signal.signal(signum, self._on_signal)

    def _remove_restore_hooks(self) -> None:
        atexit.unregister(self._restore)
        for signum, previous in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:  # someone else may have replaced ours since
                signal.signal(signum, previous)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._restore()
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        # The default action (terminate): re-deliver the signal so the exit status still says what killed us.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    # ---------------------------------------------------------------------------------------------------------------
    # Events
    # ---------------------------------------------------------------------------------------------------------------
    def poll(self) -> list[OperatorInput]:
        """Every key event since the last call; never blocks.

        A terminal that hangs up (the SSH session dropped) yields one QUIT: nobody is left to stop the robot.
        """
        if not self._entered:
            raise RuntimeError("TerminalOperator.poll() outside its `with` block")
        if self._fd is None or self._saved is None or self._hung_up:
            return []  # inert, restored early by a signal, or hung up
        now = self._clock()
        data, self._hung_up = self._read_available(self._fd)
        inputs = [i for key in self._decoder.feed(data, now) if (i := self._on_key(key, now)) is not None]
        if self._hung_up:
            inputs.append(OperatorInput(OperatorEvent.QUIT, now, key=None))
        return inputs

    @staticmethod
    def _read_available(fd: int) -> tuple[bytes, bool]:
        """What the terminal holds right now, and whether it hung up."""
        chunks: list[bytes] = []
        for _ in range(_MAX_READS_PER_POLL):
            ready, _, _ = select.select([fd], [], [], 0)
            if not ready:
                break
            try:
                chunk = os.read(fd, _READ_SIZE)
            except OSError as e:
                if e.errno != errno.EIO:  # EIO: the other end of the terminal is gone
                    raise
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)
        return b"".join(chunks), False

    def _on_key(self, key: str, now: float) -> OperatorInput | None:
        if key == CTRL_C:
            self._quit_armed_at = None
            return OperatorInput(OperatorEvent.QUIT, now, key="^C")
        event = self._bindings.get(key)
        if event is None:
            return None  # unknown keys are ignored
        if event is OperatorEvent.PAUSE:
            self._paused = not self._paused
            return OperatorInput(OperatorEvent.PAUSE if self._paused else OperatorEvent.RESUME, now, key=key)
        if event is OperatorEvent.QUIT:
            if not self._quit_pending(now):
                self._quit_armed_at = now  # the first press only asks; hint() shows the question
                return None
            self._quit_armed_at = None
        return OperatorInput(event, now, key=key)

    def _quit_pending(self, now: float) -> bool:
        return self._quit_armed_at is not None and now - self._quit_armed_at <= self._quit_confirm_s

    def hint(self) -> str:
        if self._fd is None:
            return "no operator keys (stdin is not a terminal)"
        k = self.keys
        if self._quit_pending(self._clock()):
            return f"press {k.quit} again to quit"
        if self._paused:
            return f"PAUSED {_label(k.pause, 'resume')} {_label(k.failure, 'fail/reset')} {_label(k.quit, 'quit')}"
        labels = [_label(k.success, "success"), _label(k.failure, "fail/reset"), _label(k.pause, "pause")]
        return " ".join([*labels, _label(k.quit, "quit")])


def _label(key: str, word: str) -> str:
    """ "[s]uccess" when the key is the word's first letter, else "[x] success"."""
    return f"[{key}]{word[1:]}" if word.startswith(key) else f"[{key}] {word}"
