"""The learner's update thread: one call at a time, on one thread, with a file descriptor to poll for its end."""

from __future__ import annotations

import select
import threading

import pytest

from robot_rl.learner.updater import Updater


def readable(fd: int, timeout_s: float) -> bool:
    return bool(select.select([fd], [], [], timeout_s)[0])


def test_a_call_runs_on_the_worker_and_its_end_wakes_a_poll() -> None:
    updater = Updater()
    release = threading.Event()
    try:
        updater.submit(lambda: (release.wait(10), threading.get_ident())[1])
        assert updater.busy and not readable(updater.wake_fd, 0.1)
        with pytest.raises(RuntimeError, match="still running"):
            updater.submit(lambda: None)
        release.set()
        assert readable(updater.wake_fd, 10)
        first = updater.result()
        assert first != threading.get_ident() and not updater.busy
        assert not readable(updater.wake_fd, 0)  # emptied with the result
        updater.submit(threading.get_ident)
        assert readable(updater.wake_fd, 10) and updater.result() == first  # the same thread every time
    finally:
        updater.close()
        updater.close()


def test_an_exception_in_the_update_is_raised_where_the_result_is_taken() -> None:
    updater = Updater()
    try:
        updater.submit(lambda: 1 / 0)
        assert readable(updater.wake_fd, 10)
        with pytest.raises(ZeroDivisionError):
            updater.result()
        with pytest.raises(RuntimeError, match="no update was submitted"):
            updater.result()
        updater.submit(lambda: 7)  # still usable
        assert updater.result() == 7
    finally:
        updater.close()
