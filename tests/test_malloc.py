"""robot_rl.malloc: the services' allocator settings keep megabyte-sized message buffers from being faulted in anew."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Four live buffers of a chunk's size (1.3 MB: ZeroMQ's frame, msgpack's bytes, rebuilt next observations) per
# message, 100 messages, counting the page faults of the loop in a fresh interpreter.
CHILD = """
import resource, sys
import numpy as np
from robot_rl.malloc import reuse_freed_memory

if sys.argv[1] == "services":
    assert reuse_freed_memory(), "the settings did not take effect"

def message():
    buffers = [np.ones(1_300_000, np.uint8) for _ in range(4)]
    return sum(int(b[-1]) for b in buffers)

for _ in range(5):
    message()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    message()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], check=True, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip())


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's allocator only"
)
def test_freed_message_buffers_are_reused_instead_of_faulted_in_again() -> None:
    default, services = page_faults("default"), page_faults("services")
    # 400 buffers of 318 pages each: with glibc's defaults most of them are mapped (or trimmed) and faulted in again.
    assert default > 20_000, f"glibc's defaults faulted only {default} pages: the measurement shows nothing"
    assert services < 1_000, f"{services} page faults with the services' settings (glibc's defaults: {default})"
