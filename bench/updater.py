"""What running each learner update on the updater thread costs: the hand-over, with an empty update.

    python bench/updater.py [--steps 5000]

Per step, as LearnerService._learner_step does it: submit the update to learner.updater.Updater, poll the sockets'
zmq.Poller (here only the updater's wake_fd is registered) until it is done, take the result. The update itself does
nothing, so the figures are the overhead a learner step pays for being served on its own thread. The last line is the
headline.
"""

from __future__ import annotations

import argparse
import time

import bench_main
import numpy as np
import zmq

from robot_rl.learner.updater import Updater


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=bench_main.positive_int, default=5000)
    args = parser.parse_args()
    updater = Updater()
    poller = zmq.Poller()
    poller.register(updater.wake_fd, zmq.POLLIN)
    times = []
    try:
        for _ in range(args.steps + 200):
            start = time.perf_counter()
            updater.submit(lambda: None)
            while updater.busy:
                poller.poll(50)
            updater.result()
            times.append(time.perf_counter() - start)
    finally:
        updater.close()
    us = np.asarray(times[200:]) * 1e6  # after a warm-up
    print(f"{'what':<32}{'p50 us':>10}{'p99 us':>10}{'max us':>10}")
    p50, p99 = np.percentile(us, 50), np.percentile(us, 99)
    print(f"{'submit -> poll -> result':<32}{p50:>10.1f}{p99:>10.1f}{us.max():>10.1f}")
    print(f"headline: {p50:.0f} us p50 per learner step for the update thread ({args.steps} steps)")


if __name__ == "__main__":
    bench_main.run(main)
