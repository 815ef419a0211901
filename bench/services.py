"""What bench/reliability.py and bench/fuzz.py share: a learner and actors as `robot-rl` processes on loopback, their
stats, and an audit of the learner's transition log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robot_rl.bc import make_bc_policy, save_bc
from robot_rl.config import RunConfig, dump_config, load_config
from robot_rl.demo import free_port_pair
from robot_rl.learner.service import learner_observation_space
from robot_rl.learner.store import TransitionStore
from robot_rl.obs import spec_from_space, state_bounds
from robot_rl.wire import WireError, transition_spec, validate_transitions

TINY = Path(__file__).resolve().parents[1] / "configs" / "ci_tiny.yaml"


@dataclass
class Services:
    """A run directory with a config, a BC policy and the commands of a learner and its actors."""

    root: Path
    cfg: RunConfig
    config_path: Path
    bc_dir: Path
    endpoint: str
    logs: list = field(default_factory=list)

    @classmethod
    def make(cls, root: Path, config: Path, overrides: list[str]) -> Services:
        """Write the resolved config (on a free loopback port) and a BC policy of its shapes into `root`."""
        root.mkdir(parents=True, exist_ok=True)
        endpoint = f"tcp://127.0.0.1:{free_port_pair()}"
        cfg = load_config(config, [*overrides, f"transport.learner={endpoint}"])
        config_path = root / "config.yaml"
        config_path.write_text(dump_config(cfg))
        space = learner_observation_space(cfg)
        policy = make_bc_policy(cfg.bc, spec_from_space(space), transition_spec(cfg).action_dim, *state_bounds(space))
        bc_dir = save_bc(policy, root / "bc")
        return cls(root=root, cfg=cfg, config_path=config_path, bc_dir=bc_dir, endpoint=endpoint)

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("a")
        self.logs.append(log)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "robot_rl.cli", *args, "--config", str(self.config_path), "--bc", str(self.bc_dir)]
        return subprocess.Popen([*cmd, "--quiet"], stdout=log, stderr=subprocess.STDOUT, env=env)

    def learner(self, *, resume: bool = False) -> subprocess.Popen:
        return self._spawn(
            ["learner", "--out", str(self.root / "learner"), *(["--resume"] if resume else [])], "learner"
        )

    def actor(self, actor_id: str = "actor0") -> subprocess.Popen:
        args = ["actor", "--out", str(self.root / actor_id), "--learner", self.endpoint, "--actor-id", actor_id]
        return self._spawn(args, actor_id)

    def stats(self, name: str) -> dict:
        """The stats.json of `learner` or an actor id ({} while it is being written or not there yet)."""
        try:
            return json.loads((self.root / name / "stats.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def close(self) -> None:
        for log in self.logs:
            log.close()


@dataclass
class LogAudit:
    """What the learner's transition log holds, stream by stream."""

    stored: dict[str, int]  # actor id -> transitions stored
    repeated: int  # transitions stored more than once (a sequence number seen twice in a stream)
    missing: int  # sequence numbers skipped inside a stream
    invalid: int  # stored transitions whose chunk fails validation or holds non-finite values


def audit_log(learner_dir: Path, cfg: RunConfig) -> LogAudit:
    """Read every record of the learner's log (after the learner has stopped) and check each stream's sequence and
    every chunk's arrays."""
    spec = transition_spec(cfg)
    stored: dict[str, int] = {}
    repeated = missing = invalid = 0
    streams: dict[tuple[str, str], list[int]] = {}
    with TransitionStore(learner_dir / "buffer") as store:
        chunks = store.read_back()
    for chunk in chunks:
        stored[chunk.actor_id] = stored.get(chunk.actor_id, 0) + chunk.count
        streams.setdefault((chunk.actor_id, chunk.run_id), []).extend(range(chunk.first_seq, chunk.last_seq + 1))
        try:
            validate_transitions(chunk.message(), spec)
        except (WireError, ValueError):
            invalid += chunk.count
    for seqs in streams.values():
        distinct = len(np.unique(seqs))
        repeated += len(seqs) - distinct
        missing += max(seqs) + 1 - distinct if seqs else 0
    return LogAudit(stored=stored, repeated=repeated, missing=missing, invalid=invalid)
