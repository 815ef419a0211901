"""The actor service (`robot-rl actor`): episodes on the robot (or a twin) at a fixed rate, with Q-gating.

Per step: the newest weights are swapped in at one known point (the top of the step), the BC and RL proposals are
made and gated, the chosen action goes through the env (scaled, composed and clipped to the safety box last), the
step is logged to `DIR/episodes/` and, with a learner, queued for the durable spill from which the link thread sends
it. What it does depends on the learner's phase:

| phase (learner) | the actor |
|---|---|
| none (`--learner none`), no weights yet, weights stale | BC policy alone |
| `qest_rollouts` | BC policy alone; transitions sent |
| `qest_fit`, `paused` | waits between episodes |
| `online` | Q-gated; transitions sent, each tagged with its weights version |
| `eval` | runs `train.eval_episodes` gated episodes (RL mode), reports success; nothing sent |
| done | stops |

`DIR/stats.json` (atomic, every second): actor_id, run_id, produced (transitions in the durable spill), sent, acked,
episodes and successes since this start, episode_logs (episode files in DIR/episodes, earlier starts included), phase,
weights version and age, loop overruns. `DIR/weights/` archives every weights version
swapped in (`weights_archive.py`); episode attrs and `DIR/actor_state.json` name it and the BC policy, and each step
logs the measured pose the safety mapping used, so `robot-rl replay` can re-run an episode (`replay.py`).
Restarting with the same DIR continues the run and its sequence numbers; on SIGTERM/SIGINT the actor ends the
episode, flushes, and waits (bounded) for the acks.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.actor.cameras import close_cameras, open_cameras, read_cameras
from robot_rl.actor.link import LearnerLink
from robot_rl.actor.rate import RateKeeper
from robot_rl.actor.spill import Spill
from robot_rl.actor.weights_archive import WeightsArchive
from robot_rl.actor.weights_loader import WeightsLoader
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import BC_FINGERPRINT_KEY, bc_fingerprint, load_bc
from robot_rl.config import ConfigError, RunConfig, dump_config
from robot_rl.dirlock import DirectoryLock
from robot_rl.durable import write_text_atomic
from robot_rl.envs import SIM_PEG_ENV_ID, make_env
from robot_rl.episodes import EpisodeFault, EpisodeWriter
from robot_rl.hardware.camera import CameraError
from robot_rl.hardware.interfaces import RobotConnectionLost, RobotFault
from robot_rl.hardware.operator import EVENT_CODES, OperatorEvent, apply_operator_events, logged_event, make_operator
from robot_rl.malloc import reuse_freed_memory
from robot_rl.rollout import StepChoice, bc_policy_fn, gated_policy_fn
from robot_rl.runlog import StatusLine, write_json_atomic
from robot_rl.security import check_client_keys
from robot_rl.signals import stop_signals
from robot_rl.wire import (
    EvalReport,
    Transitions,
    WireError,
    check_transition_values,
    config_fingerprint,
    join_frames,
    saved_config_differences,
    to_frames,
)

log = logging.getLogger(__name__)
# What fails an episode, is recorded in its log, and lets the actor go on after recovering.
FAULTS = (RobotFault, CameraError)
EVAL_SEED_BASE = 1_000_000


@dataclass
class ActorCounters:
    produced: int = 0
    episodes: int = 0
    successes: int = 0
    steps: int = 0
    bc_steps: int = 0
    eval_runs: int = 0
    eval_episodes: int = 0  # evaluation episodes run (not in `episodes`, which --episodes counts)
    faults: int = 0
    not_sent: int = 0  # transitions logged but not sent: values the learner would refuse (non-finite observations)
    recent: list[tuple[int, int, bool]] = field(default_factory=list)  # (steps, bc_steps, success) per episode


class ChunkBuilder:
    """Collects transitions and turns them into wire chunks at `chunk_steps` and at episode end."""

    def __init__(self, obs_spec: obs_lib.ObsSpec, action_dim: int, actor_id: str, run_id: str) -> None:
        self.obs_spec, self.action_dim = obs_spec, action_dim
        self.actor_id, self.run_id = actor_id, run_id
        self.rows: list[dict[str, np.ndarray]] = []

    def add(self, obs, action, reward, next_obs, terminated, truncated, bc_action, weights_version) -> str | None:
        """Queue one transition; the reason it is not queued (None when it is): one the learner would refuse (a
        non-finite observation from a bad sensor read, say) is kept out, since a refused chunk would be resent forever
        and hold back every transition after it."""
        row = {
            **{f"obs/{k}": np.asarray(obs[k], dtype) for k, (_, dtype) in self.obs_spec.items()},
            **{f"next_obs/{k}": np.asarray(next_obs[k], dtype) for k, (_, dtype) in self.obs_spec.items()},
            "actions": np.asarray(action, np.float32),
            "bc_actions": np.asarray(bc_action, np.float32),
            "rewards": np.float32(reward),
            "terminated": np.bool_(terminated),
            "truncated": np.bool_(truncated),
            "weights_version": np.int64(weights_version),
        }
        try:
            check_transition_values({name: value[None] for name, value in row.items()})
        except WireError as err:
            return str(err)
        self.rows.append(row)
        return None

    def take(self, first_seq: int) -> tuple[bytes, int] | None:
        """The pending rows as one chunk starting at first_seq, its wire frames joined (None if empty)."""
        if not self.rows:
            return None
        arrays = {name: np.stack([r[name] for r in self.rows]) for name in self.rows[0]}
        count = len(self.rows)
        self.rows = []
        msg = Transitions(actor_id=self.actor_id, run_id=self.run_id, first_seq=first_seq, count=count, arrays=arrays)
        return join_frames(to_frames(msg)), count


def free_disk_bytes(path: Path) -> int:
    """Bytes an unprivileged process may still write on the filesystem of `path`."""
    return shutil.disk_usage(path).free


FIRST_WEIGHTS_WAIT_S = 10.0  # an online actor waits this long at most for the first weights the learner published
NEVER_HEARD_WARN_S = 10.0  # a learner that never answered is reported after this long, then once a minute
# A learner heard before and silent this long (it broadcasts its status twice a second) is reported, well before
# actor.weights_staleness_s makes the actor act with BC alone: stopped, killed, restarting, or the network is down.
LEARNER_SILENT_WARN_S = 10.0
THROTTLED = "online: waiting for the learner's updates (actor.max_env_steps_ahead {})"
BUDGET_REACHED = "online: the run's online steps are collected; waiting for the learner's final evaluation"


class ActorError(ConfigError):
    """The actor cannot go on as asked (refused by the learner); the message says why."""


class ActorService:
    """One actor: owns the env, the policies, the episode logs, the spill and the learner link."""

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        *,
        bc_dir: Path,
        learner: str | None,
        episodes: int | None = None,
        quiet: bool = False,
    ) -> None:
        self.cfg, self.out, self.learner_endpoint = cfg, out, learner
        self.max_episodes = episodes
        out.mkdir(parents=True, exist_ok=True)
        self._check_same_run_config()
        write_text_atomic(out / "config.yaml", dump_config(cfg))
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        self.run_id = self._run_id()
        self.bc_dir = bc_dir.resolve()
        self.bc = load_bc(bc_dir)
        self.bc_fingerprint = bc_fingerprint(self.bc)  # hashes every tensor: once, for the learner and the record
        self._record_bc()  # before the arm is connected
        self.env = make_env(cfg.env)
        self.obs_spec = obs_lib.spec_from_space(self.env.observation_space)
        low, high = obs_lib.state_bounds(self.env.observation_space)
        self.action_dim = int(self.env.action_space.shape[0])
        if self.bc.obs_spec != self.obs_spec:
            self.env.close()
            raise ConfigError(
                f"--bc {bc_dir}: the BC policy observes {self.bc.obs_spec}, the config's env {self.obs_spec} "
                "(train the BC policy with this config's cameras)"
            )
        self.agent = Q2RLAgent(
            cfg.agent,
            obs_spec=self.obs_spec,
            state_low=low,
            state_high=high,
            action_dim=self.action_dim,
            bc_policy=self.bc,
            qest_alpha=cfg.qest.alpha,
            seed=cfg.seed,
        )
        self.agent.set_acting_precision(cfg.actor.gating_precision)
        self.agent.set_acting_threads(cfg.actor.gating_threads)
        self._bc_policy = bc_policy_fn(self.bc, mode=cfg.agent.bc_action, seed=cfg.seed + 101)
        self._gated_policies = {r: gated_policy_fn(self.agent, rl_action=r) for r in (None, "mode")}
        self.weights_version = -1
        self.weights_time = 0.0
        # Every version swapped in, for `robot-rl replay` (written off the control thread).
        self.weights_archive = WeightsArchive(out / "weights", background=True)
        self.counters = ActorCounters()
        # An env that keeps the wall-clock period itself (franky: each step ends at its deadline) is not paced twice.
        self.env_pacer = getattr(self.env, "pacer", None)
        self.rate = RateKeeper(0.0 if self.env_pacer is not None else cfg.actor.period_s)
        self.operator = make_operator(cfg.env.operator)
        self.cameras = open_cameras(cfg.env, self.env)
        self.status_line = StatusLine(enabled=not quiet)
        self.stop_event = threading.Event()
        self.spill: Spill | None = None
        self.link: LearnerLink | None = None
        self.weights_source: WeightsLoader | None = None  # what the swap point takes prepared weights from
        self.chunks = ChunkBuilder(self.obs_spec, self.action_dim, cfg.actor.actor_id, self.run_id)
        if learner is not None:
            self.spill = Spill(out / "spill")
            self.counters.produced = self.spill.next_seq
            self.link = LearnerLink(
                cfg, self.spill, run_id=self.run_id, endpoint=learner, fingerprint=self.bc_fingerprint
            )
            self.weights_source = WeightsLoader(
                self.link.take_weights, self.agent, min_interval_s=cfg.actor.weights_min_interval_s
            )
        self.episode_dir = out / "episodes"
        self.episode_dir.mkdir(exist_ok=True)
        self._episode_index = len(list(self.episode_dir.glob("episode_*.hdf5")))
        self._done_eval_ids: set[int] = set()
        self._last_stats = 0.0
        self.start_time = time.monotonic()
        self.message = ""
        self._stale = False  # acting with BC alone because the learner fell silent
        self._silent = False  # the learner, heard before, has been silent for LEARNER_SILENT_WARN_S (said once)
        self._faults_in_a_row = 0  # episodes in a row that failed on a robot or camera fault
        self._weights_wait_since: float | None = None  # when an online phase first waited for published weights
        self._never_heard_warned = -math.inf  # when (s after the start) the never-answered warning was last given
        self._connected_said = False  # the first welcome from the learner has been said

    def _run_id(self) -> str:
        state_path = self.out / "actor_state.json"
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("actor_id") != self.cfg.actor.actor_id:
                raise ActorError(
                    f"{self.out} belongs to actor {state.get('actor_id')!r}, not {self.cfg.actor.actor_id!r}; "
                    "use another --out or the same actor.actor_id"
                )
            return str(state["run_id"])
        run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        write_json_atomic(state_path, {"actor_id": self.cfg.actor.actor_id, "run_id": run_id})
        return run_id

    def _check_same_run_config(self) -> None:
        """A run continued in its --out keeps what its transitions and episode logs mean: ActorError naming the
        fields when the config differs from the run's config.yaml there (the parts actor and learner agree on)."""
        saved = self.out / "config.yaml"
        if not (saved.is_file() and (self.out / "actor_state.json").is_file()):
            return
        try:
            fields = saved_config_differences(saved, config_fingerprint(self.cfg))
        except ConfigError as err:
            log.warning("%s cannot be read (%s); it is replaced by this run's config", saved, err)
            return
        if fields and self._produced_nothing():
            log.info("%s: a run that produced nothing yet takes this config (it differs in %s)", self.out, fields)
            return
        if fields:
            raise ActorError(
                f"{self.out} holds a run with another config: it differs from {saved} in {fields}. "
                "Continue that run with its config (--config " + str(saved) + "), or start a new run with another "
                "--out"
            )

    def _produced_nothing(self) -> bool:
        """The run in --out has logged no episode and spilled nothing (refused before its first step: at the
        learner's handshake, say), so a corrected config or BC policy may take it over."""
        return not any((self.out / "episodes").glob("episode_*.hdf5")) and not any(
            (self.out / "spill").glob("seg_*.log")
        )

    def _record_bc(self) -> None:
        """actor_state.json names the BC policy this actor acts with (replay finds it there) and keeps its weights
        fingerprint: a continued run acts with the same policy (ActorError otherwise)."""
        state_path = self.out / "actor_state.json"
        state = json.loads(state_path.read_text())
        weights = self.bc_fingerprint[BC_FINGERPRINT_KEY]
        if state.get("bc_weights") not in (None, weights) and not self._produced_nothing():
            raise ActorError(
                f"--bc {self.bc_dir} is not the BC policy the run in {self.out} acted with (from "
                f"{state.get('bc_dir', 'an earlier --bc')}): its episodes, spill and evaluations belong to that "
                "policy. Continue with that --bc, or start a new run with another --out"
            )
        recorded = {**state, "bc_dir": str(self.bc_dir), "bc_weights": weights}
        if recorded != state:
            write_json_atomic(state_path, recorded)

    # -- weights and phase ---------------------------------------------------------------------------------------------
    def _swap_weights(self) -> None:
        """Swap in the newest weights the loader has made ready (decoded and built off this thread)."""
        ready = self.weights_source.take() if self.weights_source is not None else None
        if ready is None or ready.weights.version == self.weights_version:
            return
        weights = ready.weights
        self.agent.use_acting(ready.prepared)
        # The decoded broadcast is only read from now on: the archive's writer thread takes it without a copy.
        self.weights_archive.save(weights.version, ready.tensors, phase=weights.phase, copy=False)
        self.weights_version = weights.version
        self.weights_time = time.monotonic()

    def _first_weights_due(self) -> bool:
        """The learner has published weights this actor has not swapped in yet (the loader is still preparing them):
        wait for them, at most FIRST_WEIGHTS_WAIT_S, rather than run an online episode with the BC policy alone."""
        status = self.link.state.status if self.link is not None else None
        if self._gated() or status is None or status.weights_version < 0:
            return False
        now = time.monotonic()
        if self._weights_wait_since is None:
            self._weights_wait_since = now
        return now - self._weights_wait_since < FIRST_WEIGHTS_WAIT_S

    def _phase(self) -> tuple[str, int]:
        """(phase, eval_id) the actor should act in now."""
        if self.link is None:
            return "bc_only", -1
        st = self.link.state
        if st.refused is not None:
            return "refused", -1
        if st.status is None or not st.synced:  # no chunk is numbered before the learner said what it holds
            return "waiting", -1
        if st.status.done:
            return "done", -1
        if self.link.seconds_since_heard() > self.cfg.actor.weights_staleness_s:
            return "stale", -1
        return st.status.phase, st.status.eval_id

    def _gated(self) -> bool:
        return self.weights_version >= 0

    # -- one step ------------------------------------------------------------------------------------------------------
    def _choose(self, obs: dict[str, np.ndarray], *, gated: bool, rl_action: str | None) -> StepChoice:
        if not gated:
            return self._bc_policy(obs)
        return self._gated_policies[rl_action](obs)  # the agent's weights are swapped in place: built once

    def run_episode(self, *, kind: str, gated: bool, send: bool, seed: int | None) -> tuple[bool, int, int]:
        """One episode; returns (success, steps, BC steps). `kind` is recorded: bc_only, qest_rollouts, online, eval.

        Every episode started has its log file, one that faults at reset too. A robot or camera fault at reset or in
        a step is recorded in the log (`EpisodeFault`: the action and command of the step it cut short, which is
        neither a logged step nor a transition: it has no next observation) and raised for `run` to handle."""
        rl_action = "mode" if kind == "eval" else None
        path = self.episode_dir / f"episode_{self._episode_index:06d}.hdf5"
        self._episode_index += 1
        env_args = {
            "env_name": SIM_PEG_ENV_ID,
            "type": 4,
            "env_kwargs": {},
            "config": self.cfg.env.model_dump(mode="json"),
        }
        flush_every = 1 if self.cfg.actor.period_s > 0 else 25
        success, steps, bc_steps, done = False, 0, 0, False
        with (
            EpisodeWriter(path, env_args, flush_every=flush_every) as writer,
            writer.begin_episode(
                {
                    "kind": kind,
                    "run_id": self.run_id,
                    "actor_id": self.cfg.actor.actor_id,
                    "seed": -1 if seed is None else seed,
                    "weights_archive": str(self.weights_archive.root.resolve()),
                    "bc_dir": str(self.bc_dir),
                }
            ) as stream,
        ):
            new_episode = getattr(self.operator, "new_episode", None)
            if new_episode is not None:
                new_episode()
            try:
                obs_dict, _ = self.env.reset(seed=seed)
            except FAULTS as err:  # recorded (the file keeps the episode's attrs without steps), then handled by run()
                self._record_fault(stream, err, during="reset", step=0, command=self._unfinished_command())
                raise
            # Keys pressed during the reset move: a pause holds the arm before the first command, quit ends the
            # episode before it (the callers polled before the reset).
            self._operator_outside_steps("during the reset")
            self._restart_pacing()
            try:
                done, success, steps, bc_steps = self._episode_steps(
                    stream, obs_dict, kind=kind, gated=gated, send=send, rl_action=rl_action
                )
            finally:
                if not done and send:
                    self._close_cut_episode()
                stream.end(interrupted=not done)
        return success, steps, bc_steps

    def _check_disk(self) -> None:
        """ActorError (the episode ends as interrupted, the actor stops) when the --out disk has less free space than
        actor.min_free_disk_mb: a write that fails midway (an HDF5 log, the spill) would stop the actor uncleanly."""
        minimum = self.cfg.actor.min_free_disk_mb * 1e6
        if minimum <= 0:
            return
        free = free_disk_bytes(self.out)
        if free < minimum:
            raise ActorError(
                f"disk nearly full: {free / 1e6:.0f} MB free where the actor writes ({self.out}), below "
                f"actor.min_free_disk_mb={self.cfg.actor.min_free_disk_mb:g}; the episode was ended and the actor "
                f"stopped; free space and run the same command again (it continues in {self.out})"
            )

    def _unfinished_command(self) -> np.ndarray | None:
        """What the env had commanded the arm in the reset or step that just raised (None: nothing, or unknown)."""
        return getattr(self.env.unwrapped, "unfinished_command", None)

    def _record_fault(self, stream, err: Exception, **where) -> None:
        """End the episode's log with the record of the fault (`EpisodeFault` fields in `where`); a failure to write it
        is logged, never raised in place of the fault."""
        try:
            stream.end(fault=EpisodeFault.from_error(err, **where))
        except Exception:
            log.exception("the fault (%s) could not be recorded in the episode log", err)

    def _close_cut_episode(self) -> None:
        """An episode cut by a stop or a robot fault ends truncated (its last state was not terminal: bootstrap);
        its pending transitions are spilled so the learner sees the episode end."""
        if self.chunks.rows:
            self.chunks.rows[-1]["truncated"] = np.bool_(True)
        self._spill_chunk()

    def _episode_steps(self, stream, obs_dict, *, kind: str, gated: bool, send: bool, rl_action: str | None):
        """The step loop of one episode; returns (done, success, steps, BC steps)."""
        nan_action = np.full(self.action_dim, np.nan, np.float32)
        success, steps, bc_steps, done = False, 0, 0, False
        while not done and not self.stop_event.is_set():
            self._check_disk()
            self._swap_weights()  # the one point of the loop where weights change
            version = self.weights_version if gated else -1
            if kind == "eval" and version >= 0:
                self.weights_archive.pin(version)  # evaluated versions outlive the archive's retention
            t0 = time.monotonic()
            choice = self._choose(obs_dict, gated=gated, rl_action=rl_action)
            info = None
            try:
                next_dict, reward, terminated, truncated, info = self.env.step(choice.action)
                # The episode log has the images under obs/<camera> when the policies observe them.
                camera_extras = read_cameras(self.cameras, images=not obs_lib.image_keys(self.obs_spec))
            except FAULTS as err:  # the arm may have had this step's command: it is recorded with the fault
                # A step that raised left its command in the env; a camera read after it, in the step's info.
                command = self._unfinished_command() if info is None else info.get("command")
                self._record_fault(stream, err, during="step", step=steps, action=choice.action, command=command)
                raise
            reward, terminated, truncated, event = self._operator_step(info, reward, terminated, truncated)
            done = bool(terminated or truncated)
            e = choice.extras
            use_bc = bool(e.get("use_bc", False))
            bc_action = np.asarray(e.get("bc_action", nan_action), np.float32)
            if send:
                unsendable = self.chunks.add(obs_dict, choice.action, reward, next_dict, terminated, truncated,
                                             bc_action, version)  # fmt: skip
                if unsendable is not None:
                    self._not_sent(unsendable, step=steps)
                if len(self.chunks.rows) >= self.cfg.actor.chunk_steps or done:
                    self._spill_chunk()
            compute, overran = self.rate.tick()
            stream.append(
                obs=obs_dict,
                action=choice.action,
                reward=float(reward),
                terminated=bool(terminated),
                truncated=bool(truncated),
                next_obs=next_dict,
                extras={
                    "bc_action": bc_action,
                    "rl_action": np.asarray(e.get("rl_action", nan_action), np.float32),
                    "q_bc": np.float32(e.get("q_bc", np.nan)),
                    "q_rl": np.float32(e.get("q_rl", np.nan)),
                    "use_bc": np.bool_(use_bc),
                    "weights_version": np.int64(version),
                    "command": np.asarray(info.get("command", np.full(7, np.nan)), np.float64),
                    "target": np.asarray(info.get("target", np.full(6, np.nan)), np.float64),
                    "measured": np.asarray(info.get("measured", np.full(6, np.nan)), np.float64),
                    "joint_pos": np.asarray(info.get("joint_pos", np.full(7, np.nan)), np.float64),
                    "joint_vel": np.asarray(info.get("joint_vel", np.full(7, np.nan)), np.float64),
                    "time": np.float64(t0 - self.start_time),
                    "compute_s": np.float64(compute),
                    "overrun": np.bool_(overran),
                    "operator_event": np.int8(EVENT_CODES[event]),
                    **camera_extras,
                },
            )
            obs_dict = next_dict
            steps += 1
            bc_steps += int(use_bc)
            success = success or bool(terminated)
            self._write_stats()
        return done, success, steps, bc_steps

    def _not_sent(self, reason: str, *, step: int) -> None:
        """A transition the learner would refuse stays in the episode log only; said for the first and then every
        100th, so that a sensor giving bad values keeps showing without flooding the log."""
        c = self.counters
        c.not_sent += 1
        if c.not_sent == 1 or c.not_sent % 100 == 0:
            log.warning(
                "episode %d step %d: transition not sent to the learner (%s); it is in the episode log (%d such "
                "transitions so far): check the robot's state and the cameras",
                self._episode_index - 1,
                step,
                reason,
                c.not_sent,
            )

    def _operator_step(self, info, reward, terminated, truncated):
        """Apply the operator's events of this step (hardware.operator.apply_operator_events): success ends the
        episode terminated with reward 1, failure or quit end it truncated, pause holds the loop here (no new command
        is sent, the arm holds its target) until resume; what is pressed while paused counts for this step too.
        Returns (reward, terminated, truncated, the event the log records: hardware.operator.logged_event)."""
        observe = getattr(self.operator, "observe", None)
        if observe is not None:
            observe(info)
        events = self._hold_while_paused([item.event for item in self.operator.poll()], "")
        reward, terminated, truncated = apply_operator_events(events, reward, terminated, truncated)
        return reward, terminated, truncated, logged_event(events)

    def _hold_while_paused(self, events: list[OperatorEvent], where: str) -> list[OperatorEvent]:
        """While the operator has the actor paused: wait here (nothing is commanded, the arm holds its target),
        polling, until resume, quit or stop. Returns `events` with those pressed meanwhile; quit sets the stop. The
        step after a pause gets a whole control period (the pause is not an overrun)."""
        paused = False
        while self.operator.paused and not self.stop_event.is_set() and OperatorEvent.QUIT not in events:
            paused = True
            self.message = f"paused by the operator{' ' + where if where else ''}"
            self._write_stats()
            self.stop_event.wait(0.05)
            events += [item.event for item in self.operator.poll()]
        if paused:
            self._restart_pacing()
        if OperatorEvent.QUIT in events:
            self.stop_event.set()
        return events

    def _operator_outside_steps(self, where: str) -> None:
        """The operator's keys outside an episode's steps (waiting phases, between episodes, around a reset): pause
        holds here before the arm is moved again, quit stops the actor; success and failure belong to no step and are
        dropped, said in the log (a late key for the episode that ended, say)."""
        events = self._hold_while_paused([item.event for item in self.operator.poll()], where)
        dropped = [e.value for e in events if e in (OperatorEvent.SUCCESS, OperatorEvent.FAILURE)]
        if dropped:
            log.info("operator keys %s pressed %s belong to no episode step: ignored", dropped, where)

    def _restart_pacing(self) -> None:
        """The next step's period starts now: the actor's rate keeper and the env's deadline pacer (franky) both."""
        self.rate.start()
        if self.env_pacer is not None:
            self.env_pacer.restart()

    def _spill_chunk(self) -> None:
        assert self.spill is not None
        if self.link is not None and self.link.state.acked_seq >= self.spill.next_seq:
            # The learner holds more of this run than the spill recorded: the spill lost acknowledged chunks (cut,
            # damaged or deleted). Numbering from the spill would make the learner drop the new chunks as duplicates.
            acked = self.link.state.acked_seq
            log.warning(
                "the learner holds transitions 0..%d of run %s but the spill ends at %d (spill damaged or removed): "
                "numbering continues at %d",
                acked,
                self.run_id,
                self.spill.next_seq - 1,
                acked + 1,
            )
            self.spill.skip_to(acked + 1)
        chunk = self.chunks.take(self.spill.next_seq)
        if chunk is None:
            return
        payload, count = chunk
        # Pause (bounded outbox) rather than drop: the learner has not acknowledged enough.
        while self.link is not None and self.spill.unacked(self.link.state.acked_seq) > self.cfg.actor.max_unacked:
            self.message = "outbox full: waiting for the learner"
            self._write_stats()
            if self.stop_event.wait(0.2):
                break
        self.spill.append(payload, first_seq=self.spill.next_seq, count=count)
        self.counters.produced = self.spill.next_seq
        if self.link is not None:
            self.link.notify()

    # -- throttle ------------------------------------------------------------------------------------------------------
    def _held_back(self) -> str | None:
        """Why no online episode starts now, or None: the learner's online budget (Status.online_budget) is met by
        what it stored and what this actor still has to deliver, or this actor is more than
        actor.max_env_steps_ahead ahead of the learner's updates."""
        if self.link is None or self.link.state.status is None:
            return None
        state = self.link.state
        st = state.status
        # What the status counted, plus what this actor has sent since: acknowledged after the status came (so maybe
        # not in its counts; a status comes every 0.5 s) or not acknowledged yet. Counting it twice only holds an
        # episode back until the next status; missing it started an episode past the budget.
        counted_up_to = min(state.status_acked_seq, state.acked_seq)
        collected = st.online_env_steps + (self.spill.unacked(counted_up_to) if self.spill else 0)
        if st.online_budget is not None and collected >= st.online_budget:
            return BUDGET_REACHED
        ahead = self.cfg.actor.max_env_steps_ahead
        if ahead is not None and collected - st.learner_steps / self.cfg.train.learner_steps_per_env_step > ahead:
            return THROTTLED.format(ahead)
        return None

    # -- evaluation ----------------------------------------------------------------------------------------------------
    def _evaluate(self, eval_id: int) -> None:
        n = self.cfg.train.eval_episodes
        gated = self._gated()
        wins = steps = bc = 0
        for i in range(n):
            self._operator_outside_steps("between evaluation episodes")
            if self.stop_event.is_set():
                return
            if not self._eval_asked(eval_id):
                # Another actor reported it first (or the learner restarted under a new id): the robot's time goes
                # to what the learner asks for now rather than to episodes whose report would be ignored.
                log.info("evaluation %d is over at the learner: stopped after %d of %d episodes", eval_id, i, n)
                self._done_eval_ids.add(eval_id)
                return
            # A faulted evaluation episode (a reflex, a lost camera) is recovered from and counts as a failure.
            s, k, b = self._guarded_episode(kind="eval", gated=gated, send=False, seed=EVAL_SEED_BASE + i)
            wins, steps, bc = wins + int(s), steps + k, bc + b
            self.counters.eval_episodes += 1
            self._write_stats(force=True)
        self._done_eval_ids.add(eval_id)
        self.counters.eval_runs += 1
        report = EvalReport(
            actor_id=self.cfg.actor.actor_id,
            run_id=self.run_id,
            eval_id=eval_id,
            episodes=n,
            success_rate=wins / n,
            bc_action_fraction=bc / max(steps, 1),
            weights_version=self.weights_version if gated else -1,
        )
        self.last_eval = report
        if self.link is not None:
            self.link.send_report(report)

    def _eval_asked(self, eval_id: int) -> bool:
        """The learner's newest status still asks for this evaluation (or says nothing newer)."""
        status = self.link.state.status if self.link is not None else None
        return status is None or (status.phase == "eval" and status.eval_id == eval_id)

    # -- main loop -----------------------------------------------------------------------------------------------------
    def _start_threads(self) -> None:
        for thread in (self.link, self.weights_source):
            if thread is not None:
                thread.start()

    def run(self) -> dict:
        self._start_threads()
        self.operator.__enter__()
        seed_base = self.cfg.seed * 7919 + 31 * self._episode_index
        try:
            while self._go_on():
                if self.link is not None and self.link.error is not None:
                    raise RuntimeError(f"learner link failed: {self.link.error}")
                self._swap_weights()
                phase, eval_id = self._phase()
                self._announce(phase)
                if phase == "done":
                    break
                if phase == "refused":
                    st = self.link.state if self.link else None
                    raise ActorError(f"the learner refused this actor: {st.refused if st else ''}")
                if phase == "eval" and eval_id >= 0:
                    # An evaluation of the learner's weights waits for them as an online episode does (a restarted
                    # actor has none until they reach it), rather than evaluate the BC policy under their name.
                    if eval_id not in self._done_eval_ids and not self._first_weights_due():
                        self._evaluate(eval_id)
                    else:
                        self._idle()
                    continue
                if phase in ("waiting", "qest_fit", "paused"):
                    self._idle()
                    continue
                if phase == "online" and (held := self._held_back()) is not None:
                    if self.message == phase:  # a silent learner is said instead
                        self.message = held
                    self._idle()
                    continue
                if phase == "online" and self._first_weights_due():
                    self._idle()
                    continue
                gated = phase == "online" and self._gated()
                send = self.link is not None and phase in ("qest_rollouts", "online", "stale")
                kind = phase if phase in ("qest_rollouts", "online") else "bc_only"
                success, steps, bc_steps = self._guarded_episode(
                    kind=kind, gated=gated, send=send, seed=seed_base + self.counters.episodes
                )
                c = self.counters
                c.episodes += 1
                c.successes += int(success)
                c.steps += steps
                c.bc_steps += bc_steps
                c.recent = [*c.recent[-19:], (steps, bc_steps, success)]
                self._write_stats(force=True)
        finally:
            self._shutdown()
        return self.stats()

    def _go_on(self) -> bool:
        """Whether the run loop goes on: not stopped (signal, the operator's quit), --episodes not reached. The
        operator's keys are read here between episodes and while waiting (a pause holds the loop here)."""
        if self.stop_event.is_set():
            return False
        if self.max_episodes is not None and self.counters.episodes >= self.max_episodes:
            return False
        self._operator_outside_steps("between episodes")
        return not self.stop_event.is_set()

    def _guarded_episode(self, *, kind: str, gated: bool, send: bool, seed: int) -> tuple[bool, int, int]:
        """run_episode, with a robot or camera fault recovered from: such an episode failed (success False, no steps
        counted; its log records the fault). ActorError when faults come too often (_after_fault)."""
        try:
            result = self.run_episode(kind=kind, gated=gated, send=send, seed=seed)
        except RobotFault as err:
            self._recover_robot(err)
            self._after_fault(err)
            return False, 0, 0
        except CameraError as err:  # a stale or lost camera: the episode failed, the camera reconnects itself
            self.counters.faults += 1
            self.message = f"camera fault: {err}"
            log.warning("episode failed on a camera fault: %s", err)
            self._after_fault(err)
            return False, 0, 0
        self._faults_in_a_row = 0
        return result

    def _after_fault(self, err: Exception) -> None:
        """After an episode that failed on a fault: wait before the next reset (0.5 s, doubling), and stop with
        ActorError once actor.max_faults_in_a_row episodes in a row have failed, so that a camera or robot that stays
        broken does not make the arm reset again and again."""
        self._faults_in_a_row += 1
        limit = self.cfg.actor.max_faults_in_a_row
        if self._faults_in_a_row >= limit:
            raise ActorError(
                f"{self._faults_in_a_row} episodes in a row failed on faults, the last: {err}; stopped (the robot "
                f"holds its last target); check the cameras and the robot, then run the same command again"
            )
        self.stop_event.wait(min(0.5 * 2 ** (self._faults_in_a_row - 1), 10.0))

    def _say_connected(self) -> None:
        """Say once, when the learner first welcomes this actor, that it is connected and where its run stands."""
        st = self.link.state
        if self._connected_said or not st.welcomed:
            return
        self._connected_said = True
        acked = st.acked_seq + 1
        waiting = self.spill.unacked(st.acked_seq) if self.spill is not None else 0
        log.info(
            "actor %s: connected to the learner at %s (run %s; %d transitions of this actor held there, %d in the "
            "spill to send)",
            self.cfg.actor.actor_id,
            self.learner_endpoint,
            self.run_id,
            acked,
            waiting,
        )

    def _warn_if_never_heard(self, phase: str) -> None:
        """While the learner has never answered: a warning after NEVER_HEARD_WARN_S, then once a minute (a wrong
        address, a learner not started yet, or CURVE keys it does not accept: all look the same from here)."""
        if phase != "waiting" or self.link is None or self.link.state.status is not None:
            return
        waited = time.monotonic() - self.start_time
        if waited >= NEVER_HEARD_WARN_S and waited - self._never_heard_warned >= 60.0:
            self._never_heard_warned = waited
            keys = self.cfg.transport.keys_dir
            log.warning(
                "no answer from the learner at %s for %.0f s: is it running, is the address right%s? Waiting.",
                self.learner_endpoint,
                waited,
                ", and does it run without CURVE keys (a learner with transport.keys_dir answers only actors given "
                "keys too)"
                if keys is None
                else f", and does its authorized/ hold this actor's key and {keys}/learner.key the learner's",
            )

    def _announce(self, phase: str) -> None:
        """Show the phase; say (warning) when the learner falls silent, when the actor then acts with BC alone, and
        when the learner is back."""
        stale = phase == "stale"
        self.message = "learner silent: BC only" if stale else phase
        self._warn_if_never_heard(phase)
        if self.link is None:
            return
        self._say_connected()
        quiet_s = self.link.seconds_since_heard()
        limit = min(LEARNER_SILENT_WARN_S, self.cfg.actor.weights_staleness_s)
        # The learner's last word was that it is stopping (a signal): said at once, not after its silence.
        stopping = not stale and getattr(self.link.state.status, "stopping", False)
        silent = stale or stopping or (self.link.state.last_heard > 0 and quiet_s > limit)
        if stopping:
            self.message = f"{phase} (learner stopping)"
        elif silent and not stale:
            self.message = f"{phase} (learner silent {quiet_s:.0f} s)"
        unacked = self.spill.unacked(self.link.state.acked_seq) if self.spill is not None else 0
        if stale and not self._stale:
            log.warning(
                "no word from the learner at %s for %.0f s: acting with the BC policy alone (episodes still logged "
                "and spilled) until it is back",
                self.learner_endpoint,
                quiet_s,
            )
        elif silent and not self._silent:
            if stopping:
                why = f"the learner at {self.learner_endpoint} says it is stopping (learner --resume brings it back)"
            else:
                why = (
                    f"no word from the learner at {self.learner_endpoint} for {quiet_s:.0f} s (stopped, restarting, "
                    "or the network is down)"
                )
            log.warning(
                "%s: going on with weights version %d, with the BC policy alone after %.0f s without it "
                "(actor.weights_staleness_s); %d transitions wait unacknowledged in %s and are sent when it is back",
                why,
                self.weights_version,
                self.cfg.actor.weights_staleness_s,
                unacked,
                self.out / "spill",
            )
        elif self._silent and not silent:
            log.warning(
                "the learner is back (phase %s)%s; %d transitions still to be acknowledged",
                phase,
                ": gating resumes with its weights" if self._stale else "",
                unacked,
            )
        self._silent, self._stale = silent, stale

    def _recover_robot(self, err: RobotFault) -> None:
        """After a fault: report it, then recover (reflex, control error) or rebuild the client (connection lost).
        A robot that cannot be recovered stops the actor with the reason."""
        self.counters.faults += 1
        self.message = f"robot fault ({type(err).__name__}): {err}; recovering"
        log.warning("episode failed on a robot fault: %s", err)
        self._write_stats(force=True)
        env = self.env.unwrapped
        robot = env.robot
        reconnect = getattr(env, "reconnect", None) or getattr(robot, "reconnect", None)  # the env's restarts a server
        if isinstance(err, RobotConnectionLost) and reconnect is not None:
            reconnect()  # raises RobotConnectionLost when every attempt fails
        elif not robot.recover():
            raise RobotFault(f"the robot did not recover after: {err}") from err
        self.message = f"recovered from {type(err).__name__}"

    def _idle(self) -> None:
        self._write_stats()
        self.stop_event.wait(0.05)

    def _shutdown(self) -> None:
        if self.link is not None and self.spill is not None:
            deadline = time.monotonic() + self.cfg.actor.stop_wait_s
            unacked = self.spill.unacked(self.link.state.acked_seq)
            if unacked > 0 and not self._learner_stopping():
                log.warning(
                    "stopping: waiting up to %.0f s (actor.stop_wait_s) for the learner to acknowledge %d transitions",
                    self.cfg.actor.stop_wait_s,
                    unacked,
                )
            while self.spill.unacked(self.link.state.acked_seq) > 0 and time.monotonic() < deadline:
                if self.link.state.refused is not None or not self.link.is_alive() or self._learner_stopping():
                    break  # nothing more will be acknowledged now: what is unacknowledged stays in the spill
                time.sleep(0.05)
                self._write_stats()
            self.link.stop()
            self.link.join(timeout=2.0)
        if self.weights_source is not None and self.weights_source.is_alive():
            self.weights_source.stop()
            self.weights_source.join(timeout=5.0)
        self.agent.set_acting_threads(1)
        self._write_stats(force=True)
        self.weights_archive.close()
        self.operator.__exit__(None, None, None)
        close_cameras(self.cameras)
        self.status_line.close()
        self.env.close()

    def _learner_stopping(self) -> bool:
        """The learner's newest status says it is stopping (it acknowledges nothing more until --resume)."""
        status = self.link.state.status if self.link is not None else None
        return bool(getattr(status, "stopping", False))

    # -- stats ---------------------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        c = self.counters
        link = self.link.state if self.link else None
        recent = c.recent
        return {
            "actor_id": self.cfg.actor.actor_id,
            "run_id": self.run_id,
            "learner": self.learner_endpoint or "none",
            "produced": c.produced,
            "sent": (link.sent_seq + 1) if link else 0,
            "acked": (link.acked_seq + 1) if link else 0,
            "episodes": c.episodes,  # since this start (what --episodes counts)
            "eval_episodes": c.eval_episodes,
            "episode_logs": self._episode_index,  # in DIR/episodes, over every start with this DIR (evaluations too)
            "successes": c.successes,
            "success_rate_recent": (sum(s for _, _, s in recent) / len(recent)) if recent else None,
            "bc_fraction_recent": (sum(b for _, b, _ in recent) / max(sum(k for k, _, _ in recent), 1))
            if recent
            else None,
            "phase": self.message,
            "weights_version": self.weights_version,
            "weights_age_s": round(time.monotonic() - self.weights_time, 1) if self.weights_version >= 0 else None,
            "refused": link.refused if link else None,
            # Broadcasts holding NaN or inf: skipped, the actor kept the weights it had.
            "weights_refused": self.weights_source.refused if self.weights_source else 0,
            # Seconds to decode and build a broadcast's networks on the loader thread (p99 of the latest 100).
            "weights_prepare_p99_s": self.weights_source.prepare_p99_s() if self.weights_source else None,
            # Weights versions not archived: writes that failed, versions dropped while the disk was too far behind.
            "weights_archive_failures": self.weights_archive.failures,
            "weights_archive_dropped": self.weights_archive.dropped,
            "faults": c.faults,
            "not_sent": c.not_sent,
            # What the spill's recovery found at start: transitions lost to damage inside it, and cut with a torn
            # tail (a write the crash interrupted); see the log for which.
            "spill_lost": self.spill.lost_transitions if self.spill else 0,
            "spill_cut": self.spill.cut_transitions if self.spill else 0,
            "loop": self.rate.stats.summary()
            | ({"overruns": self.rate.stats.overruns + self.env_pacer.overruns} if self.env_pacer else {}),
            "wall_s": round(time.monotonic() - self.start_time, 1),
        }

    def _write_stats(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < 1.0:
            return
        self._last_stats = now
        s = self.stats()
        write_json_atomic(self.out / "stats.json", s)
        self.status_line.update(
            {
                "phase": s["phase"],
                "episodes": s["episodes"],
                "success(recent)": "-" if s["success_rate_recent"] is None else f"{s['success_rate_recent']:.2f}",
                "bc-frac": "-" if s["bc_fraction_recent"] is None else f"{s['bc_fraction_recent']:.2f}",
                "weights": f"v{s['weights_version']}" + (f" ({s['weights_age_s']}s)" if s["weights_age_s"] else ""),
                "sent/acked": f"{s['sent']}/{s['acked']} of {s['produced']}",
                "overruns": s["loop"].get("overruns", 0),
                "faults": s["faults"],
            }
            | ({"weights refused": s["weights_refused"]} if s["weights_refused"] else {}),
            force=force,  # in a log: a line at each forced write (episode ends, faults) besides the periodic one
        )


def run_actor(
    cfg: RunConfig, out: Path, *, bc_dir: Path, learner: str | None, episodes: int | None, quiet: bool = False
) -> int:
    """`robot-rl actor`: run until done, N episodes, or SIGINT/SIGTERM (then flush and wait for the last acks)."""
    reuse_freed_memory()  # weights frames, camera frames and chunks reuse heap memory instead of fresh pages
    if learner is not None and cfg.transport.keys_dir is not None:  # before anything is written or started
        check_client_keys(Path(cfg.transport.keys_dir), cfg.actor.actor_id)
    if out.exists() and not out.is_dir():
        raise ActorError(f"--out {out} is a file; give the actor a directory")
    with DirectoryLock(out, what="actor"):  # a second actor on this --out is refused; the running one goes on
        service = ActorService(cfg, out, bc_dir=bc_dir, learner=learner, episodes=episodes, quiet=quiet)
        stats = _run(service)
    rate = stats["successes"] / max(stats["episodes"], 1)
    evals = f" (and {stats['eval_episodes']} evaluation episodes)" if stats["eval_episodes"] else ""
    print(
        f"actor {stats['actor_id']}: {stats['episodes']} episodes{evals}, success {rate:.2f}, produced "
        f"{stats['produced']}, acked {stats['acked']}; run directory {out}",
        flush=True,
    )
    unacked = stats["produced"] - stats["acked"]
    if learner is not None and unacked > 0:
        print(
            f"robot-rl actor: {unacked} transitions are not acknowledged by the learner yet; they stay in "
            f"{out / 'spill'} and are sent when the actor runs again with --out {out}",
            file=sys.stderr,
        )
        return 1
    return 0


def _run(service: ActorService) -> dict:
    """service.run(), stopped by SIGINT/SIGTERM (the episode ends, the spill is flushed, the last acks waited for)."""

    def on_signal(signum, frame) -> None:
        service.stop_event.set()

    previous = {s: signal.signal(s, on_signal) for s in stop_signals()}
    try:
        stats = service.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stats
