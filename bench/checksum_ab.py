"""The transition log's record checksum in the transport's "stored" row: XXH3 (the store's) against zlib crc32 (the
layout before it), alternated so that a machine whose speed drifts favours neither.

    python bench/checksum_ab.py [--rounds 3] [--seconds 4]

Each round runs bench/transport.py's "2cam 84x84 stored" row (a sender process, the learner's receive path, the
store's writer and sync threads) once with each checksum. For crc32 the store's checksum function is replaced in this
process only, so the log it writes is not a valid log (its header says XXH3); nothing reads it back. The last line is
the headline: the median of each.
"""

from __future__ import annotations

import argparse
import statistics
import zlib

import transport  # bench/transport.py, beside this script

import robot_rl.learner.store as store
from robot_rl.malloc import reuse_freed_memory

CHECKSUMS = {
    "xxh3": store._checksum,
    "crc32": lambda flags, payload: zlib.crc32(payload, zlib.crc32(bytes([flags]))),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds; each measures both checksums.")
    parser.add_argument("--seconds", type=float, default=4.0, help="Measured seconds per row.")
    args = parser.parse_args()
    reuse_freed_memory()  # as `robot-rl learner` does
    spec = transport.image_spec()
    rates: dict[str, list[float]] = {name: [] for name in CHECKSUMS}
    print(f"{'round':>5} {'checksum':<8} {'stored transitions/s':>21}")
    for round_ in range(1, args.rounds + 1):
        for name, checksum in CHECKSUMS.items():
            store._checksum = checksum
            rate = transport.measure_transitions(spec, 30, "stored", args.seconds).transitions_per_s
            rates[name].append(rate)
            print(f"{round_:>5} {name:<8} {rate:>21,.0f}", flush=True)
    store._checksum = CHECKSUMS["xxh3"]
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(
        "headline: stored 2cam 84x84 transitions/s, median of "
        + ", ".join(f"{name} {rate:,.0f}" for name, rate in medians.items())
        + f" ({(medians['xxh3'] / medians['crc32'] - 1) * 100:+.1f}% with xxh3)"
    )


if __name__ == "__main__":
    main()
