"""Kill the learner and the actor with SIGKILL at random moments during a run, restart them, and count transitions.

    python bench/reliability.py [--kills 10] [--seed 0] [--outage 0] [--config configs/ci_tiny.yaml]
                                [--set path=value ...]

Runs `robot-rl learner` and `robot-rl actor` as processes on loopback, as the demo does (the tiny state config by
default, with enough online steps to outlast the kills; the actor unpaced and not held back by the learner's
progress). At random moments, 2-6 s apart, it SIGKILLs one of them (alternating, `--kills` times each) and starts it
again: the learner with `--resume` (after `--outage` seconds down, the actor spilling meanwhile), the actor with the
same `--out` (so the same run continues). Kills land anywhere:
mid-episode, mid-chunk, during an fsync, a checkpoint or a weights broadcast. Then it stops both cleanly (SIGTERM: the
actor flushes and waits for its last acknowledgements) and compares the actor's produced and acked counts with what
the learner's log holds, reading every record back: transitions lost (produced but not stored), stored twice, or
skipped in a stream, and chunks that fail validation. The last line is the headline.
"""

from __future__ import annotations

import argparse
import random
import signal
import tempfile
import time
from pathlib import Path

import bench_main
from services import TINY, Services, audit_log

OVERRIDES = [
    "train.env_steps=100000",  # longer than the kills take: the run is stopped, not finished
    "actor.period_s=0.002",
    "actor.max_env_steps_ahead=null",  # transitions flow whenever both are up, however little the learner learns
    "train.checkpoint_every=60",  # checkpoints often: kills land in them too
    "train.eval_every=100000",  # the actor's episodes are sent (evaluation episodes are not)
]


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=bench_main.positive_int, default=10, help="SIGKILLs of each process.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--outage", type=bench_main.non_negative_float, default=0.0, help="Seconds a killed learner stays down."
    )
    parser.add_argument("--config", type=Path, default=TINY)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    parser.add_argument("--keep", type=Path, help="Run in this directory and keep it (default: a temporary one).")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        root = args.keep or Path(tmp)
        services = Services.make(root, args.config, [*OVERRIDES, *args.overrides])
        procs = {"learner": services.learner(), "actor": services.actor()}
        kills = {"learner": 0, "actor": 0}
        start = time.monotonic()
        try:
            wait_for(lambda: services.stats("actor0").get("acked", 0) > 0, 120, "the first acknowledgement")
            order = [name for _ in range(args.kills) for name in ("learner", "actor")]
            for name in order:
                time.sleep(rng.uniform(2.0, 6.0))
                for other, proc in procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{other} exited on its own ({proc.returncode}); see {root / other}.log")
                procs[name].send_signal(signal.SIGKILL)
                procs[name].wait()
                kills[name] += 1
                if name == "learner":
                    time.sleep(args.outage)
                procs[name] = services.learner(resume=True) if name == "learner" else services.actor()
                print(f"{time.monotonic() - start:6.1f} s: killed the {name} ({kills[name]}), restarted", flush=True)
            acked = services.stats("actor0").get("acked", 0)
            wait_for(lambda: services.stats("actor0").get("acked", 0) > acked, 120, "acknowledgements after the kills")
            procs["actor"].send_signal(signal.SIGTERM)
            actor_code = procs["actor"].wait(timeout=120)
            procs["learner"].send_signal(signal.SIGTERM)
            learner_code = procs["learner"].wait(timeout=120)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
            services.close()
        actor, learner = services.stats("actor0"), services.stats("learner")
        audit = audit_log(root / "learner", services.cfg)
        stored = audit.stored.get("actor0", 0)
        lost = actor["produced"] - stored
        elapsed = time.monotonic() - start
    print(f"{kills['learner']} learner and {kills['actor']} actor SIGKILLs in {elapsed:.0f} s; clean stop: actor exit "
          f"{actor_code}, learner exit {learner_code}")  # fmt: skip
    print(f"{'produced':>9} {'acked':>9} {'stored':>9} {'lost':>5} {'stored twice':>13} {'skipped':>8} {'invalid':>8}"
          f" {'duplicates dropped':>19}")  # fmt: skip
    dropped = learner.get("actors", {}).get("actor0", {}).get("duplicates", 0)
    print(f"{actor['produced']:>9} {actor['acked']:>9} {stored:>9} {lost:>5} {audit.repeated:>13} {audit.missing:>8}"
          f" {audit.invalid:>8} {dropped:>19}")  # fmt: skip
    print(f"headline: {kills['learner']} + {kills['actor']} SIGKILLs: {lost} lost, {audit.repeated} stored twice, "
          f"{audit.missing} skipped, {audit.invalid} invalid of {stored} stored transitions")  # fmt: skip


if __name__ == "__main__":
    bench_main.run(main)
