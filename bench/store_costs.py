"""What the learner's transition log costs the transport's "stored" row: its record checksum and its writes.

    python bench/store_costs.py [--rounds 3] [--seconds 4] [--variants xxh3,crc32,no-checksum,no-write]

Each round runs bench/transport.py's "2cam 84x84 stored" row (a sender process, the learner's receive path, the
store's writer and sync threads) once per variant, alternated so that a machine whose speed drifts favours none:
  xxh3:        the store as it is (XXH3 record checksums);
  crc32:       zlib crc32 instead, the layout before XXH3;
  no-checksum: no checksum computed;
  no-write:    no checksum and no write either: the sync thread fsyncs a file that does not grow. Nothing is durable;
               this is the ceiling that no log layout or I/O method (O_DIRECT, ...) could pass on this machine.
Variants other than xxh3 replace the store's functions in this process only; the logs they leave are not valid
logs, and nothing reads them back. The last line is the headline: each variant's median.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import bench_main
import transport  # bench/transport.py, beside this script

import robot_rl.learner.store as store
from robot_rl.malloc import reuse_freed_memory

SHIPPED = {"checksum": store._checksum, "write": store._write_all}
VARIANTS: dict[str, dict[str, Callable[..., Any]]] = {
    "xxh3": {},
    "crc32": {"checksum": store._crc32_checksum},
    "no-checksum": {"checksum": lambda flags, payload: 0},
    "no-write": {"checksum": lambda flags, payload: 0, "write": lambda fd, buffers: None},
}


def use(variant: str) -> None:
    parts = {**SHIPPED, **VARIANTS[variant]}
    store._checksum, store._write_all = parts["checksum"], parts["write"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=bench_main.positive_int, default=3, help="Rounds; each measures every variant once."
    )
    parser.add_argument("--seconds", type=bench_main.positive_float, default=4.0, help="Measured seconds per row.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated, from: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    reuse_freed_memory()  # as `robot-rl learner` does
    spec = transport.image_spec()
    rates: dict[str, list[float]] = {name: [] for name in variants}
    print(f"{'round':>5} {'variant':<12} {'stored transitions/s':>21}")
    for round_ in range(1, args.rounds + 1):
        for name in variants:
            use(name)
            rate = transport.measure_transitions(spec, 30, "stored", args.seconds).transitions_per_s
            rates[name].append(rate)
            print(f"{round_:>5} {name:<12} {rate:>21,.0f}", flush=True)
    use("xxh3")
    medians = ", ".join(f"{name} {statistics.median(values):,.0f}" for name, values in rates.items())
    print(f"headline: stored 2cam 84x84 transitions/s, median of {args.rounds}: {medians}")


if __name__ == "__main__":
    bench_main.run(main)
