"""`robot-rl learner`: the learner service (design §4-§6). It owns the phase, the replay buffer and the networks.

The composition root of the learner: it builds the agent, the replay buffer, the durable transition store and the
sockets, and drives the phases

    eval (eval_id 0: the BC policy alone)  ->  qest_rollouts  ->  qest_fit  ->  online  <->  eval  ->  done

(methods without Q-Estimation go from the first evaluation straight to online; without a BC policy there is no first
evaluation). One thread serves the sockets and drives the phases: between learner steps it serves them without
waiting, otherwise it waits at most `transport.poll_ms` for a request, and it checks the stop event every time round.
Each online learner update runs on a thread of its own (learner/updater.py) while this thread goes on receiving,
storing, acknowledging and reporting status; weights broadcasts, phase changes and checkpoints wait for the update.

Sockets: a ROUTER at `transport.learner` answers the actors' DEALERs (hello -> welcome or refuse, transitions -> ack
or refuse, eval_report -> nothing or refuse); a PUB at `transport.weights_endpoint` broadcasts `Status` every
`transport.status_every_s` and `Weights` every WEIGHTS_EVERY learner steps and at every phase change once weights
exist. A periodic broadcast waits (up to WEIGHTS_MAX_WAIT_S) until ZeroMQ has handed the previous one to every
actor's connection, and the broadcasts due meanwhile become one with the newest weights: a link slower than the
learner gets the newest weights as often as it can carry them, and no backlog of old ones piles up in memory.

Transitions are stored exactly once per (actor_id, run_id) and sequence number: a chunk is appended to the durable
log (learner/store.py), whose writer thread writes and fsyncs what arrived meanwhile as one group while this thread
goes on receiving; every reply is held until the store has fsync'd all that was appended before it was made,
so an ack never covers a transition that is not on disk. Duplicates are dropped and counted, and a chunk past a gap
is not stored (the ack tells the actor where to resume).

The run directory holds config.yaml, eval.csv, stats.json (rewritten at least once a second), tb/, buffer/ (the
transition logs), checkpoints/ (latest, periodic step_*, final), summary.json and curves.png. `resume=True` rebuilds
the buffer and sequence counters from buffer/ and the networks, optimisers, temperature, counters, weights version
and phase from checkpoints/latest.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zmq
from gymnasium import spaces

from robot_rl import obs as obs_lib
from robot_rl.agent import Q2RLAgent, UpdateStats
from robot_rl.bc import BC_FINGERPRINT_KEY, bc_fingerprint, load_bc, save_bc
from robot_rl.buffer import ReplayBuffer, learner_buffer
from robot_rl.checkpoint import MANIFEST_FILE, CheckpointError, load_checkpoint, prune_checkpoints, save_checkpoint
from robot_rl.config import STATE_OBS_KEY, ConfigError, RunConfig, dump_config
from robot_rl.dirlock import DirectoryLock, holds_only_the_lock
from robot_rl.durable import write_text_atomic
from robot_rl.malloc import reuse_freed_memory
from robot_rl.prefetch import learner_sampler
from robot_rl.qestimation import Rollout, run_q_estimation
from robot_rl.runlog import EvalRow, RunLog, StatusLine, plot_curves, write_json_atomic
from robot_rl.security import key_owners
from robot_rl.signals import stop_signals
from robot_rl.train import (
    check_compile,
    check_demos_env,
    checkpoint_bc_entry,
    demo_buffer,
    resolve_device,
    warn_image_learner_on_cpu,
)
from robot_rl.wire import (
    ID_PATTERN,
    PHASES,
    Ack,
    EvalReport,
    Hello,
    Message,
    Refuse,
    Status,
    Transitions,
    Welcome,
    WireError,
    check_hello,
    config_fingerprint,
    from_frames,
    saved_config_differences,
    to_wire,
    transition_spec,
    validate_transitions,
)

from .broadcast import WeightsFrames
from .store import HeldReplies, StoredChunk, StoreError, TransitionStore
from .updater import Updater

EVAL_ID_JUMP_ON_RESUME = 1000
log = logging.getLogger("robot_rl.learner")

WEIGHTS_EVERY = 30  # learner steps between weight broadcasts (design §6)
# A periodic broadcast waits while the previous one is still being handed to the actors' connections (a slow link: an
# image config's weights are ~61 MB, 0.5 s on 1 Gb/s), for at most this long; meanwhile due broadcasts fold into one.
WEIGHTS_MAX_WAIT_S = 5.0
# Messages the PUB queues per actor connection beyond what is on the wire: a weights broadcast and the statuses sent
# while it leaves (a few seconds of them on a slow link). An actor that stops reading (stopped, stuck) then holds at
# most this many messages in the learner's memory, mostly statuses, since weights go out at most every few seconds
# (an image config's are ~61 MB each); what comes after is dropped for that actor alone, as PUB does.
PUB_SNDHWM = 16
# Chunks of one stream alternating between connections this often within the window: two actors, one id and run.
SENDER_SWITCHES, SENDER_WINDOW_S = 3, 10.0
UNIDENTIFIED = "peers without an accepted hello"  # their refusals share one log budget (_log_refusal)
STATS_EVERY_S = 0.5  # stats.json is rewritten at least this often
# Status(done=True) is broadcast until no actor has sent transitions for this long (at least two chunks' time at the
# actors' period), for at most this long (at least two episodes' time): actors finish their episodes first.
DONE_QUIET_S = 2.0
DONE_MAX_S = 30.0
BATCH_MESSAGES = 64  # requests handled per poll before the held replies are looked at again
# An evaluation's report is waited for at least DEFAULT_EVAL_TIMEOUT_S, and EVAL_TIMEOUT_FACTOR times what its
# episodes take at the config's rate (20 episodes of 200 steps at 10 Hz: 400 s of steps, resets not counted); a wait
# longer than EVAL_WAIT_FACTOR times that (at least EVAL_WAIT_MIN_S) is reported, and again as often, until it ends.
DEFAULT_EVAL_TIMEOUT_S = 600.0
EVAL_TIMEOUT_FACTOR = 3.0
EVAL_WAIT_FACTOR = 1.5
EVAL_WAIT_MIN_S = 30.0
# With several actors an evaluation is scored over every actor's episodes. Once the first report is in, the reports of
# the other actors it counts on (those heard within EVAL_ACTIVE_S of its start, and those that said hello since) are
# waited for EVAL_GATHER_FACTOR times what its episodes take (at least EVAL_GATHER_MIN_S, at most until its timeout).
EVAL_ACTIVE_S = 60.0
EVAL_GATHER_FACTOR = 0.5
EVAL_GATHER_MIN_S = 10.0
# After a stop, an update still running (a first step compiling) is waited for this long; then the learner leaves
# without a checkpoint of the networks (--resume continues from the last one; every acknowledged transition is on disk).
UPDATE_STOP_WAIT_S = 10.0
STARVED_WARN_S = 60.0  # a phase that waits for transitions says so after this long without any, and as often
# How often the learner says that its actors are an evaluation interval or more ahead of its updates.
OUTRUN_WARN_S = 300.0
DIFFERENCES_SHOWN = 5  # a refused hello names every differing field, and the values of this many
TRAIN_SCALARS_EVERY = 100  # learner steps between TensorBoard training scalars
CHECKPOINTS = "checkpoints"
LATEST = "latest"


class LearnerError(ConfigError):
    """The learner cannot start or resume as asked; the message says why and what to do."""


class _Stopped(Exception):
    """The stop event was set while a long computation (Q-Estimation) was running."""


class _UpdateLeftRunning(Exception):
    """The stop event was set and the running update did not finish within UPDATE_STOP_WAIT_S."""


def eval_wait_s(cfg: RunConfig) -> tuple[float, float]:
    """(what an evaluation's episodes take at the config's rate, how long the learner waits for its report)."""
    steps = cfg.train.eval_episodes * cfg.env.task.max_episode_steps
    expected = steps * max(cfg.actor.period_s, cfg.env.task.control_period_s)
    return expected, max(DEFAULT_EVAL_TIMEOUT_S, EVAL_TIMEOUT_FACTOR * expected)


def learner_observation_space(cfg: RunConfig) -> spaces.Dict:
    """The env's Dict observation space, known without building the env (no robot needed on the learner's machine).

    The same keys, shapes, dtypes and bounds as RobotEnv's: the end-effector pose with the safety box widened by the
    observation margins, and an 84x84x3 uint8 image per camera.
    """
    from robot_rl.hardware.env import OBS_MARGIN_M, OBS_MARGIN_RAD
    from robot_rl.hardware.safety import widened_limits

    boxes: dict[str, spaces.Box] = {}
    for key, (shape, dtype) in transition_spec(cfg).obs.items():
        if key == STATE_OBS_KEY:
            low, high = widened_limits(cfg.env.safety, OBS_MARGIN_M, OBS_MARGIN_RAD)
            boxes[key] = spaces.Box(low.astype(np.float32), high.astype(np.float32), shape, np.float32)
        else:
            boxes[key] = spaces.Box(0, 255, shape, np.dtype(dtype))
    return spaces.Dict(boxes)


# --------------------------------------------------------------------------------------------------------------------
# Bookkeeping
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Counters:
    """Environment steps stored (all, and online only) and learner steps done."""

    env_steps: int = 0
    online_env_steps: int = 0
    learner_steps: int = 0


@dataclass
class ActorStats:
    """What one actor id has sent: stored and duplicate transitions, refused messages, chunks past a gap."""

    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    gaps: int = 0
    lost: int = 0  # transitions the actor said it lost for good (its spill was damaged)
    last_seen: float | None = None


@dataclass(frozen=True)
class EvalResult:
    """One evaluation over the episodes of every actor that reported it: rates weighted by episodes."""

    success_rate: float
    bc_action_fraction: float
    episodes: int
    per_actor: tuple[tuple[str, float, int], ...]  # (actor id, success rate, episodes) per report

    @classmethod
    def of(cls, reports: list[EvalReport]) -> EvalResult:
        episodes = sum(r.episodes for r in reports)
        return cls(
            success_rate=sum(r.success_rate * r.episodes for r in reports) / episodes,
            bc_action_fraction=sum(r.bc_action_fraction * r.episodes for r in reports) / episodes,
            episodes=episodes,
            per_actor=tuple((r.actor_id, r.success_rate, r.episodes) for r in reports),
        )

    def describe(self) -> str:
        """Success rate overall and per actor, for the log."""
        each = ", ".join(f"{name} {rate:.2f} over {n}" for name, rate, n in self.per_actor)
        return f"success {self.success_rate:.2f} over {self.episodes} episodes ({each})"


@dataclass
class _Piece:
    """Part of an episode still being assembled from a stream's chunks."""

    obs: dict[str, np.ndarray]
    actions: np.ndarray
    rewards: np.ndarray
    last_next_obs: dict[str, np.ndarray]  # where the piece left off: the next piece of its episode starts there


@dataclass
class Stream:
    """One (actor_id, run_id): the next sequence number to store, the transitions stored, and the open Q-Estimation
    episode."""

    next_seq: int = 0
    stored: int = 0
    pending: list[_Piece] = field(default_factory=list)
    # When its newest chunk was stored, whether that chunk left an episode open (more of it is on the way), and the
    # time between its latest two chunks of one episode (the actor's own pace: its actor.period_s may differ).
    last_chunk_at: float | None = None
    episode_open: bool = False
    chunk_interval_s: float = 0.0

    def skip_to(self, seq: int) -> None:
        """Continue at `seq` past transitions that were lost: an open Q-Estimation episode is broken by the loss and
        is no rollout."""
        self.next_seq = seq
        self.pending = []

    def chunk_stored(self, arrays: dict[str, np.ndarray]) -> None:
        now = time.monotonic()
        if self.episode_open and self.last_chunk_at is not None:
            self.chunk_interval_s = now - self.last_chunk_at
        self.last_chunk_at = now
        self.episode_open = not (bool(arrays["terminated"][-1]) or bool(arrays["truncated"][-1]))


def _loopback(endpoint: str) -> bool:
    """Whether a ZeroMQ endpoint is reachable from this machine only (loopback TCP, ipc, inproc)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return scheme in ("ipc", "inproc")
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # an interface name or a host name: may be reachable from elsewhere
        return False


def _check_out_dir(out: Path, *, resume: bool, fingerprint: dict[str, str]) -> None:
    """Refuse a non-empty run directory without resume, and a resume with a config that disagrees with the run's."""
    if out.exists() and not out.is_dir():
        raise LearnerError(f"run directory {out} is a file")
    if not resume:
        if out.exists() and not holds_only_the_lock(out):
            raise LearnerError(
                f"run directory {out} exists and is not empty; pass --resume to continue the run in it, "
                "or choose another --out"
            )
        return
    if not out.is_dir() or not any((out / name).exists() for name in ("config.yaml", "buffer", CHECKPOINTS)):
        raise LearnerError(
            f"nothing to resume in {out}: no learner run there (no config.yaml, buffer/ or {CHECKPOINTS}/); "
            "start a new run without --resume"
        )
    saved = out / "config.yaml"
    if saved.is_file():
        try:
            fields = saved_config_differences(saved, fingerprint)
        except ConfigError as err:  # the run's own copy, damaged: nothing to compare with
            log.warning("%s cannot be read (%s); it is replaced by this run's config", saved, err)
            return
        if fields:
            raise LearnerError(f"cannot resume {out}: the config differs from the run's {saved} in {fields}")


def _resume_state(manifest: dict[str, Any], path: Path) -> dict[str, Any]:
    """The learner state a checkpoint's manifest holds, each field checked; CheckpointError naming the first bad one."""
    learner = manifest.get("learner")
    counters = manifest.get("counters")
    if not isinstance(learner, dict) or not isinstance(counters, dict):
        raise CheckpointError(f"checkpoint {path}: the manifest has no learner state (not a learner checkpoint?)")
    fields: dict[str, tuple[Any, Callable[[Any], bool]]] = {
        "learner_steps": (counters.get("learner_steps"), lambda v: type(v) is int and v >= 0),
        "phase": (learner.get("phase"), lambda v: v in PHASES),
        "eval_kind": (learner.get("eval_kind"), lambda v: isinstance(v, str)),
        "eval_id": (learner.get("eval_id"), lambda v: type(v) is int),
        "weights_version": (learner.get("weights_version"), lambda v: type(v) is int),
        "qest_done": (learner.get("qest_done"), lambda v: type(v) is bool),
        "online_started": (learner.get("online_started"), lambda v: type(v) is bool),
        "next_eval_at": (learner.get("next_eval_at"), lambda v: type(v) is int),
        "next_ckpt_at": (learner.get("next_ckpt_at"), lambda v: type(v) is int),
        "bc_success_rate": (learner.get("bc_success_rate"), lambda v: v is None or isinstance(v, int | float)),
        "wall_s": (learner.get("wall_s"), lambda v: isinstance(v, int | float)),
        "learner_time_s": (learner.get("learner_time_s"), lambda v: isinstance(v, int | float)),
        "q_estimation": (learner.get("q_estimation"), lambda v: isinstance(v, dict)),
        "next_seq": (
            learner.get("next_seq", {}),
            lambda v: isinstance(v, dict) and all(type(n) is int for n in v.values()),
        ),
    }
    for name, (value, valid) in fields.items():
        if not valid(value):
            raise CheckpointError(f"checkpoint {path / MANIFEST_FILE}: {name} is missing or invalid ({value!r})")
    state = {name: value for name, (value, _) in fields.items()}
    state["wall_s"], state["learner_time_s"] = float(state["wall_s"]), float(state["learner_time_s"])
    return state


# --------------------------------------------------------------------------------------------------------------------
# The service
# --------------------------------------------------------------------------------------------------------------------
class LearnerService:
    """One learner run: sockets, durable store, replay buffer, agent, phases and the run directory."""

    def __init__(
        self,
        cfg: RunConfig,
        out: Path,
        *,
        bc_dir: Path | None,
        demos: Path | None = None,
        resume: bool = False,
        learner_id: str = "learner",
        quiet: bool = False,
        eval_timeout_s: float | None = None,
    ) -> None:
        """`eval_timeout_s`: how long an evaluation's report is waited for (None: from the config, `eval_wait_s`)."""
        if not re.match(ID_PATTERN, learner_id):
            raise LearnerError(f"learner id {learner_id!r} must match {ID_PATTERN}")
        self.cfg, self.out = cfg, Path(out)
        self.learner_id, self.quiet = learner_id, quiet
        self.eval_expected_s, self.eval_timeout_s = eval_wait_s(cfg)
        if eval_timeout_s is not None:
            self.eval_timeout_s = eval_timeout_s
        self.eval_warn_every_s = min(
            max(EVAL_WAIT_FACTOR * self.eval_expected_s, EVAL_WAIT_MIN_S), self.eval_timeout_s / 2
        )
        if demos is not None and cfg.agent.effective_offline_ratio <= 0:
            raise LearnerError(
                f"method {cfg.agent.method} samples no demonstrations (offline ratio 0), so --demos {demos} would "
                "be ignored: drop --demos, or set agent.offline_ratio above 0 to sample them"
            )
        self.device = resolve_device(cfg.train.device)  # refused before the run directory is touched
        check_compile(cfg.train.compile, self.device)
        self.spec = transition_spec(cfg)
        self.fingerprint = config_fingerprint(cfg)
        _check_out_dir(self.out, resume=resume, fingerprint=self.fingerprint)
        warn_image_learner_on_cpu(cfg, self.device, log.warning)  # after the refusals: said of a run that goes on
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        space = learner_observation_space(cfg)
        self.obs_spec = obs_lib.spec_from_space(space)
        low, high = obs_lib.state_bounds(space)
        self.action_dim = self.spec.action_dim
        self.bc = self._load_bc(bc_dir)
        if self.bc is not None:  # an actor must act with the same BC policy (refused at the handshake if not)
            self.fingerprint = {**self.fingerprint, **bc_fingerprint(self.bc)}
        self.agent = Q2RLAgent(
            cfg.agent,
            obs_spec=self.obs_spec,
            state_low=low,
            state_high=high,
            action_dim=self.action_dim,
            bc_policy=self.bc,
            qest_alpha=cfg.qest.alpha,
            seed=cfg.seed,
            device=self.device,
            amp=cfg.train.bf16,
            compile=cfg.train.compile,
            cuda_graph=cfg.train.cuda_graph and self.device.type == "cuda",
        )
        try:
            self.buffer = learner_buffer(cfg.train, self.obs_spec, self.action_dim, self.device)
        except ConfigError as exc:
            raise LearnerError(str(exc)) from None
        self.offline = self._offline_buffer(demos)
        self.sampler = learner_sampler(self.buffer, self.offline, cfg, self.rng, self.device)

        self.counters = Counters()
        self.streams: dict[tuple[str, str], Stream] = {}
        self.actors: dict[str, ActorStats] = {}
        self.sessions: dict[bytes, tuple[str, str]] = {}
        # With CURVE: the actor each authorised public key belongs to.
        keys_dir = cfg.transport.keys_dir
        self._key_owners: dict[str, str] = key_owners(Path(keys_dir)) if keys_dir is not None else {}
        self.refused_unidentified = 0
        self._refusal_log: dict[str, tuple[float, int]] = {}
        # Per stream: (the connection its last chunk came on, switches of connection in the window, window start).
        self._senders: dict[tuple[str, str], tuple[bytes, int, float]] = {}
        self.rollouts: list[Rollout] = []
        self.qest_stats: dict[str, Any] = {}
        # Phase state. Without a BC policy there is nothing to evaluate before learning: start online.
        self.phase = "eval" if self.bc is not None else "online"
        self.eval_id = 0 if self.bc is not None else -1
        self.eval_kind = "bc"
        self.eval_started = self.eval_warned = 0.0
        self.eval_reports: dict[str, EvalReport] = {}  # actor id -> its report of the running evaluation
        self.eval_awaited: set[str] = set()  # actors whose report the running evaluation counts on
        self.eval_first_report = 0.0
        self.eval_gather_s = min(max(EVAL_GATHER_FACTOR * self.eval_expected_s, EVAL_GATHER_MIN_S), self.eval_timeout_s)
        self.weights_version = -1
        self.qest_done = not cfg.agent.uses_q_estimation
        self.online_started = False
        self.next_eval_at = cfg.train.eval_every
        self.next_ckpt_at = cfg.train.checkpoint_every
        self.bc_success_rate: float | None = None
        self.done = False
        self.wall_offset = 0.0
        self.learner_time = 0.0

        self.store = TransitionStore(self.out / "buffer")
        self.held: HeldReplies[tuple[bytes, Message]] = HeldReplies(self.store)
        self._weights_frames = WeightsFrames()
        self.updater = Updater()
        self._weights_due = False  # a periodic broadcast is waiting for the previous one to leave
        self.weights_folded = 0  # periodic broadcasts folded into a later one while they waited
        self._poller = zmq.Poller()
        self.evallog = RunLog(self.out, resume=resume)
        if resume:
            self._restore()
        write_text_atomic(self.out / "config.yaml", dump_config(cfg))
        self.start = time.monotonic()
        self._stop = threading.Event()
        self._last_status = self._last_stats = -math.inf
        self._last_transitions = -math.inf  # when an actor last sent transitions
        self._phase_since = -math.inf  # when the current phase began (a starved phase is timed from then)
        self._starved_warned = -math.inf
        self._outrun_warned = -math.inf
        self._ctx: zmq.Context | None = None
        self._auth: Any = None
        self.router: zmq.Socket | None = None
        self.pub: zmq.Socket | None = None
        self.status = StatusLine(enabled=False)

    # -- set-up -------------------------------------------------------------------------------------------------------
    def _load_bc(self, bc_dir: Path | None) -> torch.nn.Module | None:
        if bc_dir is None:
            if self.cfg.agent.method != "sac":
                raise LearnerError(f"method {self.cfg.agent.method} needs a BC policy: pass --bc DIR")
            return None
        bc = load_bc(bc_dir, self.device)
        if (bc.obs_spec, bc.action_dim) != (self.obs_spec, self.action_dim):
            raise LearnerError(
                f"BC policy {bc_dir} takes observations {bc.obs_spec} and {bc.action_dim}-dim actions; "
                f"the config has {self.obs_spec} and {self.action_dim}"
            )
        return bc

    def _offline_buffer(self, demos: Path | None) -> ReplayBuffer | None:
        """Demonstrations for RLPD-style offline sampling (agent.effective_offline_ratio > 0)."""
        if self.cfg.agent.effective_offline_ratio <= 0:
            return None
        if demos is None:
            raise LearnerError(
                f"method {self.cfg.agent.method} samples demonstrations (offline ratio "
                f"{self.cfg.agent.effective_offline_ratio}): pass --demos FILE"
            )
        try:
            check_demos_env(demos, self.cfg.env)
            return demo_buffer(demos, self.obs_spec, self.action_dim, device=self.buffer.device)
        except ValueError as exc:
            raise LearnerError(str(exc)) from None

    def _open_sockets(self) -> None:
        transport = self.cfg.transport
        self._ctx = ctx = zmq.Context()
        self.router, self.pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.MAXMSGSIZE, transport.max_message_bytes)
            sock.setsockopt(zmq.LINGER, 200)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
        if transport.keys_dir is not None:
            from robot_rl.security import SecurityError, secure_server

            try:
                self._auth = secure_server(ctx, [self.router, self.pub], keys_dir=Path(transport.keys_dir))
            except SecurityError as exc:  # a LearnerError: a new run refused here leaves no directory behind
                raise LearnerError(str(exc)) from None
        weights_what = "transport.weights" if transport.weights is not None else "the bind port + 1"
        for sock, endpoint, what in (
            (self.router, transport.learner, "requests from actors: --bind, transport.learner"),
            (self.pub, transport.weights_endpoint, f"weights and status to actors: {weights_what}"),
        ):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                raise LearnerError(f"cannot bind {endpoint} ({what}): {exc}") from exc
            if transport.keys_dir is None and not _loopback(endpoint):
                log.warning(
                    "%s is bound on %s without transport.keys_dir: anyone who reaches it can read the weights and "
                    "send transitions; make keys (robot-rl keys) and set transport.keys_dir, or bind on 127.0.0.1",
                    what.split(":")[0],
                    endpoint,
                )
        self._poller.register(self.router, zmq.POLLIN)
        self._poller.register(self.store.wake_fd, zmq.POLLIN)
        self._poller.register(self.updater.wake_fd, zmq.POLLIN)

    def _close(self) -> None:
        self.updater.close(timeout=0 if self.updater.busy else None)  # an update left running is not waited for
        self.sampler.close()
        for sock in (self.router, self.pub):
            if sock is not None:
                sock.close(linger=200)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        try:
            self.store.close()
        except StoreError as err:  # nothing after the failure was acknowledged; the actors resend it
            log.error("transition log closed after a failed write: %s", err)
        self.evallog.close()
        self.status.close()

    # -- the loop -----------------------------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        """Serve and learn until the run is done (returns the summary) or `stop` is set (returns the counters so far,
        with `finished` False, after a checkpoint)."""
        self._stop = stop if stop is not None else threading.Event()
        self.status = StatusLine(enabled=not self.quiet)
        self.start = time.monotonic()
        try:
            self._open_sockets()
            self._begin()
            while not self._stop.is_set() and not self.done:
                due = self._learner_step_due()
                self._serve(0 if due else self._poll_ms())
                if due:
                    self._learner_step()
                self._advance()
                self._periodic()
            if self.done:
                return self._finish()
            return self._interrupted()
        except _Stopped:
            return self._interrupted()
        except _UpdateLeftRunning:
            self._say_stopping()
            log.warning(
                "learner stopped while an update was still running after %.0f s: no checkpoint written now; "
                "run directory %s (--resume continues from the last checkpoint, with every stored transition)",
                UPDATE_STOP_WAIT_S,
                self.out,
            )
            return {"finished": False, **self._progress()}
        except BaseException:  # a full disk, a failed update...: the actors hear it now, not from its silence
            self._say_stopping()
            raise
        finally:
            self._send_held_replies()
            self._write_stats()
            self._close()

    def _poll_ms(self) -> int:
        """transport.poll_ms, shortened so that the next status broadcast and stats.json write are not late."""
        now = time.monotonic()
        next_due = min(self._last_status + self.cfg.transport.status_every_s, self._last_stats + STATS_EVERY_S)
        if next_due <= now:
            return 0
        return min(self.cfg.transport.poll_ms, math.ceil((next_due - now) * 1000))

    def _begin(self) -> None:
        """Announce the phase the run starts (or resumes) in."""
        if self.phase == "eval":
            self.eval_started = time.monotonic()
        elif self.phase == "online" and not self.online_started:
            self._go_online()
            return
        if self.weights_version >= 0:
            self._publish_weights()
        self._publish_status()
        self._show(force=True)

    def _say_stopping(self) -> None:
        """Tell the actors now that this learner is stopping (else they learn it from its silence, seconds later)."""
        if self.pub is None:
            return
        try:
            self._publish_status(stopping=True)
        except zmq.ZMQError as exc:
            log.info("could not tell the actors that the learner is stopping: %s", exc)

    def _interrupted(self) -> dict[str, Any]:
        self._say_stopping()
        self._checkpoint(LATEST)
        log.warning("learner stopped in phase %s; run directory %s (continue with --resume)", self.phase, self.out)
        return {"finished": False, **self._progress()}

    def _progress(self) -> dict[str, Any]:
        return {
            "method": self.cfg.agent.method,
            "seed": self.cfg.seed,
            "phase": self.phase,
            "env_steps": self.counters.env_steps,
            "online_env_steps": self.counters.online_env_steps,
            "learner_steps": self.counters.learner_steps,
            "weights_version": self.weights_version,
            "wall_s": self._wall(),
        }

    def _wall(self) -> float:
        return round(self.wall_offset + time.monotonic() - self.start, 2)

    # -- serving requests ---------------------------------------------------------------------------------------------
    def _serve(self, timeout_ms: int) -> None:
        """Handle the requests waiting (up to BATCH_MESSAGES), then send the replies whose chunks are fsync'd.

        Waits at most `timeout_ms` for a request or for the store's writer to finish a group.
        """
        assert self.router is not None
        events = dict(self._poller.poll(timeout_ms))
        if self.router in events:
            for _ in range(BATCH_MESSAGES):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                identity = frames[0].bytes
                if len(frames) < 2:
                    reply = self._refuse(identity, "expected a message after the identity frame, got none")
                else:
                    # With CURVE, the public key the connection authenticated with (Z85); else None.
                    key = frames[1].get("User-Id") if self._key_owners else None
                    reply = self._handle(identity, [frame.buffer for frame in frames[1:]], key)
                if reply is not None:
                    self.held.hold((identity, reply))
        self._send_released()

    def _send_released(self) -> None:
        """Send the held replies whose chunks the store has fsync'd (only those are acknowledged), in order."""
        assert self.router is not None
        for identity, reply in self.held.release():
            try:
                self.router.send_multipart([identity, to_wire(reply)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # the peer is gone or its queue is full: it resends after reconnecting
                log.info("reply to a peer dropped: %s", exc)

    def _send_held_replies(self) -> None:
        """On the way out: wait for the store's last fsync and send the acknowledgements it releases."""
        if self.router is None or not len(self.held):
            return
        try:
            self.store.sync()
            self._send_released()
        except StoreError as err:  # already logged by the writer; the exception on the way out stays the original
            log.error("acknowledgements held at exit not sent: %s", err)

    def _handle(self, identity: bytes, frames: list[memoryview], key: str | None = None) -> Message | None:
        """The reply to one message (its frames, without the identity); None when there is none to send."""
        try:
            msg = from_frames(frames, max_bytes=self.cfg.transport.max_message_bytes)
        except WireError as err:
            return self._refuse(identity, str(err))
        session = self.sessions.get(identity)
        if session is not None:
            self.actors[session[0]].last_seen = time.monotonic()
        if isinstance(msg, Hello):
            return self._on_hello(identity, msg, key)
        if isinstance(msg, Transitions):
            return self._on_transitions(identity, msg, frames)
        if isinstance(msg, EvalReport):
            return self._on_eval_report(identity, msg)
        return self._refuse(identity, f"kind: the learner does not accept {msg.kind} messages")

    def _refuse(
        self,
        identity: bytes,
        reason: str,
        fields: list[str] | None = None,
        *,
        who: str | None = None,
        level: int = logging.WARNING,
    ) -> Refuse:
        """Count and log a refusal (at `level`); `who` names the sender in the log when its session does not (a
        refused hello)."""
        session = self.sessions.get(identity)
        if session is not None:
            self.actors[session[0]].refused += 1
            who = key = f"actor {session[0]} (run {session[1]})"
        else:
            self.refused_unidentified += 1
            who = who or "an unidentified peer"
            key = UNIDENTIFIED  # what such a peer claims to be is its own choice: one budget for all of them
        self._log_refusal(key, who, reason, level)
        return Refuse(reason=reason[:4096], fields=fields or [])

    def _log_refusal(self, key: str, who: str, reason: str, level: int = logging.WARNING) -> None:
        """One warning per second at most per accepted actor, and one for all peers without an accepted hello (a
        hostile or confused peer cannot flood the log, whatever names it sends); the refusals in between are counted
        in the stats and summarised in the next warning."""
        now = time.monotonic()
        last, suppressed = self._refusal_log.get(key, (-math.inf, 0))
        if now - last < 1.0:
            self._refusal_log[key] = (last, suppressed + 1)
            return
        more = f" (and {suppressed} more refusals in the last second)" if suppressed else ""
        log.log(level, "refused a message from %s: %s%s", who, reason, more)
        self._refusal_log[key] = (now, 0)

    def _on_hello(self, identity: bytes, hello: Hello, key: str | None) -> Message:
        if self._key_owners:  # CURVE: an actor says hello only under the id its key was made for
            owner = self._key_owners.get(key or "")
            if owner != hello.actor_id:
                self.sessions.pop(identity, None)
                whose = f"the key of actor {owner}" if owner else "a key not in authorized/"
                return self._refuse(  # a field named: the actor stops and says why instead of saying hello again
                    identity,
                    f"actor {hello.actor_id}: this connection authenticated with {whose}; an actor may say "
                    "hello only under the id its key pair was made for (robot-rl keys --actors ...)",
                    ["actor.actor_id"],
                )
        for other, (actor_id, run_id) in self.sessions.items():
            if other != identity and actor_id == hello.actor_id and run_id != hello.run_id:
                seen = time.monotonic() - self.actors[actor_id].last_seen
                if seen < 60:
                    log.warning(
                        "actor id %s is in use by run %s (heard %.0f s ago) and now says hello from run %s: two actors "
                        "with one id? their counts merge in stats.json (its runs keep them apart) and only the first "
                        "evaluation report of the id counts; give each actor its own --actor-id",
                        actor_id, run_id, seen, hello.run_id,
                    )  # fmt: skip
                break
        unchecked = () if self.bc is not None else (BC_FINGERPRINT_KEY,)
        refusal = check_hello(hello, self.fingerprint, unchecked=unchecked)
        if refusal is not None:
            self.sessions.pop(identity, None)
            reason = f"actor {hello.actor_id}: {refusal.reason}{self._differences(hello, refusal.fields)}"
            return self._refuse(
                identity, reason, refusal.fields, who=f"actor {hello.actor_id} (run {hello.run_id}, hello)"
            )
        key = (hello.actor_id, hello.run_id)
        self.sessions[identity] = key
        self.actors.setdefault(hello.actor_id, ActorStats()).last_seen = time.monotonic()
        if self.phase == "eval" and hello.actor_id not in self.eval_reports:
            self.eval_awaited.add(hello.actor_id)  # it evaluates too: its report is waited for
        stream = self.streams.setdefault(key, Stream())
        log.info("welcomed actor %s (run %s), acked up to %d", hello.actor_id, hello.run_id, stream.next_seq - 1)
        if self.weights_version >= 0:  # a (re)started actor has no weights: broadcast them again soon
            self._weights_due = True
        return Welcome(
            learner_id=self.learner_id,
            phase=self.phase,
            weights_version=self.weights_version,
            acked_seq=stream.next_seq - 1,
        )

    def _differences(self, hello: Hello, fields: list[str]) -> str:
        """Each differing field's value on both sides (the first few), for the refusal both sides log."""
        shown = [f for f in fields if f != BC_FINGERPRINT_KEY][:DIFFERENCES_SHOWN]
        if not shown:
            return ""
        theirs, ours = hello.config_fingerprint, self.fingerprint
        values = "; ".join(f"{f}: learner {ours.get(f, '(none)')}, actor {theirs.get(f, '(none)')}" for f in shown)
        return f" ({values})"

    def _session_refusal(self, identity: bytes, actor_id: str, run_id: str, kind: str) -> Refuse | None:
        """The Refuse for a message from a peer without an accepted hello or with other ids than its hello."""
        session = self.sessions.get(identity)
        if session is None:  # a new connection, or one an actor opened to this learner before it restarted
            return self._refuse(
                identity,
                f"{kind} before an accepted hello on this connection (a learner restarted since the hello, or a new "
                "connection): say hello first",
                who=f"a peer sending as actor {actor_id} (run {run_id})",
                # An actor of this run reconnecting after a restart of the learner does this once: no warning.
                level=logging.INFO if actor_id in self.actors else logging.WARNING,
            )
        if session != (actor_id, run_id):
            return self._refuse(
                identity,
                f"{kind} for actor {actor_id} run {run_id} on a connection that said hello as "
                f"actor {session[0]} run {session[1]}",
            )
        return None

    def _on_transitions(self, identity: bytes, msg: Transitions, frames: list[memoryview]) -> Message:
        refusal = self._session_refusal(identity, msg.actor_id, msg.run_id, "transitions")
        if refusal is not None:
            return refusal
        try:
            validate_transitions(msg, self.spec)
        except WireError as err:
            return self._refuse(identity, str(err))
        key = (msg.actor_id, msg.run_id)
        stream, stats = self.streams[key], self.actors[msg.actor_id]
        self._last_transitions = time.monotonic()
        self._check_one_sender(key, identity)
        if msg.first_seq > stream.next_seq and msg.first_seq - msg.lost_before <= stream.next_seq:
            # The actor lost these for good (its spill was damaged): the stream goes on past them.
            lost = msg.first_seq - stream.next_seq
            stats.lost += lost
            log.error(
                "actor %s run %s: transitions %d..%d are lost at the actor (its spill was damaged, or it released "
                "them after an acknowledgement this learner does not hold: a learner started anew on the run, or "
                "resumed from an older state; the actor's log says which); the stream continues at %d",
                *key,
                stream.next_seq,
                msg.first_seq - 1,
                msg.first_seq,
            )
            stream.skip_to(msg.first_seq)
        if msg.last_seq < stream.next_seq:
            stats.duplicates += msg.count
        elif msg.first_seq > stream.next_seq:
            stats.gaps += 1
            log.info(
                "actor %s run %s: chunk at %d past a gap (expected %d); not stored",
                *key,
                msg.first_seq,
                stream.next_seq,
            )
        else:
            skip = stream.next_seq - msg.first_seq
            stats.duplicates += skip
            chunk = StoredChunk(
                actor_id=msg.actor_id,
                run_id=msg.run_id,
                first_seq=stream.next_seq,
                arrays={name: array[skip:] for name, array in msg.arrays.items()},
                online=self.online_started,
                continues=None if msg.rows_continue is None else msg.rows_continue[skip:],
            )
            # A whole chunk is logged as received (its frames, or its one frame), a trimmed one encoded anew.
            self.store.append(chunk, (frames if len(frames) > 1 else frames[0]) if skip == 0 else None)
            self._ingest(chunk, stream)
            stream.chunk_stored(chunk.arrays)
            stats.stored += chunk.count
        return Ack(actor_id=msg.actor_id, run_id=msg.run_id, acked_seq=stream.next_seq - 1)

    def _check_one_sender(self, key: tuple[str, str], identity: bytes) -> None:
        """Warn when one stream's chunks keep alternating between two connections: two actors under one id and run (an
        actor's --out copied to a second robot PC), whose transitions would be taken for each other's duplicates. An
        actor that reconnects switches connection once; alternating SENDER_SWITCHES times within SENDER_WINDOW_S is
        said, at most once per window."""
        now = time.monotonic()
        last = self._senders.get(key)
        if last is None or last[0] == identity:
            self._senders[key] = (identity, *(last[1:] if last else (0, now)))
            return
        switches, since = (last[1] + 1, last[2]) if now - last[2] < SENDER_WINDOW_S else (1, now)
        self._senders[key] = (identity, switches, since)
        if switches == SENDER_SWITCHES:
            log.warning(
                "actor %s run %s: transitions arrive on two connections at once; two actors with one --out (copied "
                "to a second robot PC?) send under the same id and run, and one's transitions are dropped as the "
                "other's duplicates: give each actor its own --out and --actor-id",
                *key,
            )

    def _on_eval_report(self, identity: bytes, report: EvalReport) -> Message | None:
        refusal = self._session_refusal(identity, report.actor_id, report.run_id, "eval_report")
        if refusal is not None:
            return refusal
        if self.phase == "eval" and report.eval_id == self.eval_id and report.actor_id not in self.eval_reports:
            if self.eval_kind != "bc" and report.weights_version < 0:
                # Acted with the BC policy alone (the actor had no weights yet): not an evaluation of the weights.
                self.eval_awaited.discard(report.actor_id)
                self._weights_due = True
                others = bool(self.eval_reports or self.eval_awaited)
                log.warning(
                    "evaluation %d: actor %s had no weights yet and evaluated the BC policy alone; its report is not "
                    "used, %s",
                    report.eval_id,
                    report.actor_id,
                    "the evaluation is scored on the other actors' reports"
                    if others
                    else f"and the evaluation is asked for again (as {report.eval_id + 1}) with the weights broadcast "
                    "anew",
                )
                if not others:
                    self._start_eval(self.eval_kind)
                return None
            if not self.eval_reports:
                self.eval_first_report = time.monotonic()
            self.eval_reports[report.actor_id] = report
        elif report.eval_id == self.eval_id:  # resent (reports go again until the evaluation is over): had it
            log.debug("evaluation report %d from actor %s again", report.eval_id, report.actor_id)
        else:
            log.info(
                "ignoring evaluation report %d from actor %s (asked for %d)",
                report.eval_id,
                report.actor_id,
                self.eval_id if self.phase == "eval" else -1,
            )
        return None

    # -- storing ------------------------------------------------------------------------------------------------------
    def _obs(self, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
        """The dict observation of a (validated) chunk."""
        return {k: arrays[f"{prefix}/{k}"] for k in self.obs_spec}

    def _ingest(self, chunk: StoredChunk, stream: Stream) -> None:
        """Put a stored chunk into the replay buffer, count it, and assemble Q-Estimation episodes from it."""
        a, n = chunk.arrays, chunk.count
        obs, next_obs = self._obs(a, "obs"), self._obs(a, "next_obs")
        # BC rollouts executed the BC action: it is the BC proposal at that state (as in the single-process loop).
        bc_actions = a["bc_actions"] if chunk.online else a["actions"]
        with self.sampler.lock:
            self.buffer.add_many(
                obs=obs,
                actions=a["actions"],
                rewards=a["rewards"],
                next_obs=next_obs,
                terminated=a["terminated"],
                truncated=a["truncated"],
                bc_actions=bc_actions,
                continues=chunk.continues,  # what the wire knows: the buffer need not compare the images
            )
        stream.next_seq = chunk.last_seq + 1
        stream.stored += chunk.count
        self.counters.env_steps += n
        if chunk.online:
            self.counters.online_env_steps += n
        elif not self.qest_done:
            self._assemble(stream, obs, next_obs, a, name=f"{chunk.actor_id}@{chunk.run_id}")

    def _assemble(
        self, stream: Stream, obs: dict, next_obs: dict, a: dict[str, np.ndarray], *, name: str = "?"
    ) -> None:
        """Complete episodes (ending at terminated or truncated) of a stream become Q-Estimation rollouts."""
        ends = np.flatnonzero(np.asarray(a["terminated"]) | np.asarray(a["truncated"]))
        start = 0
        for end in (*ends.tolist(), len(a["actions"]) - 1):
            if start > end:
                continue
            piece = _Piece(
                {k: np.array(v[start : end + 1]) for k, v in obs.items()},
                np.asarray(a["actions"][start : end + 1], np.float32),
                np.asarray(a["rewards"][start : end + 1], np.float32),
                {k: np.array(v[end]) for k, v in next_obs.items()},
            )
            if stream.pending and not all(
                np.array_equal(stream.pending[-1].last_next_obs[k], piece.obs[k][0]) for k in piece.obs
            ):
                # The open episode did not go on here: it ended without an end mark (its actor was killed, or a fault
                # struck just after a chunk was sent) and a new one began. Joined, the two would make one rollout
                # with the wrong returns.
                log.warning(
                    "Q-Estimation: an episode of stream %s ended after %d steps without its end mark (the actor was "
                    "stopped, or a fault struck right after a chunk); it is not used as a rollout",
                    name,
                    sum(len(p.actions) for p in stream.pending),
                )
                stream.pending = []
            stream.pending.append(piece)
            if bool(a["terminated"][end]) or bool(a["truncated"][end]):
                pieces, stream.pending = stream.pending, []
                self.rollouts.append(
                    Rollout(
                        obs=obs_lib.concat([p.obs for p in pieces]),
                        actions=np.concatenate([p.actions for p in pieces]),
                        rewards=np.concatenate([p.rewards for p in pieces]),
                        terminated=bool(a["terminated"][end]),
                        final_next_obs={k: np.array(v[end : end + 1]) for k, v in next_obs.items()},
                    )
                )
            start = end + 1

    # -- phases -------------------------------------------------------------------------------------------------------
    def _set_phase(self, phase: str) -> None:
        """Enter a phase: broadcast it (weights too, once they exist), checkpoint, show it."""
        self.phase = phase
        self._phase_since = time.monotonic()
        if self.weights_version >= 0 or (self.qest_done and self.online_started):
            self._publish_weights()
        self._publish_status()
        self._checkpoint(LATEST)
        self._write_stats()
        self._show(force=True)

    def _advance(self) -> None:
        """Move on when the current phase is complete."""
        if self.phase == "eval":
            result = self._eval_result()
            if result is not None:
                self._eval_done(result)
            elif time.monotonic() - self.eval_started > self.eval_timeout_s:
                log.warning(
                    "no report for evaluation %d within %.0f s; continuing without it (no row in eval.csv)",
                    self.eval_id,
                    self.eval_timeout_s,
                )
                self._eval_done(None)
            else:
                self._warn_eval_wait()
        elif (
            self.phase == "qest_rollouts" and len(self.rollouts) >= self.cfg.qest.rollouts
        ) or self.phase == "qest_fit":
            self._q_estimation()
        elif self.phase == "online":
            if self._eval_due():
                self._start_eval("online")
            elif self.counters.online_env_steps >= self.next_ckpt_at:
                # The next due point first: the checkpoints record it, so a resume from them does not save again.
                while self.next_ckpt_at <= self.counters.online_env_steps:
                    self.next_ckpt_at += self.cfg.train.checkpoint_every
                self._checkpoint(f"step_{self.counters.online_env_steps:08d}")
                prune_checkpoints(self.out / CHECKPOINTS, self.cfg.train.keep_checkpoints)
                self._checkpoint(LATEST)

    def _warn_eval_wait(self) -> None:
        """Say, every eval_warn_every_s, that an evaluation's report is late, for how long it is still waited for, and
        when each actor was last heard (an actor stopped during an evaluation never reports; any running one does)."""
        now = time.monotonic()
        waited = now - self.eval_started
        if waited < self.eval_warn_every_s or now - self.eval_warned < self.eval_warn_every_s:
            return
        self.eval_warned = now
        log.warning(
            "evaluation %d: no report after %.0f s (its %d episodes take about %.0f s at %g s a step); waiting "
            "%.0f s more, then going on without it. Actors last heard: %s. An actor stopped during the evaluation "
            "does not report: start one (any actor id) to evaluate",
            self.eval_id,
            waited,
            self.cfg.train.eval_episodes,
            self.eval_expected_s,
            max(self.cfg.actor.period_s, self.cfg.env.task.control_period_s),
            self.eval_timeout_s - waited,
            self._last_heard(now),
        )

    def _eval_result(self) -> EvalResult | None:
        """The running evaluation's result once every awaited actor reported, or the first report is eval_gather_s
        old (scored then on the reports in, saying whose is missing); None while it waits."""
        if not self.eval_reports:
            return None
        missing = sorted(self.eval_awaited - set(self.eval_reports))
        now = time.monotonic()
        if (
            missing
            and now - self.eval_first_report < self.eval_gather_s
            and now - self.eval_started < self.eval_timeout_s
        ):
            return None
        result = EvalResult.of(list(self.eval_reports.values()))
        if missing:
            log.warning(
                "evaluation %d: no report from %s within %.0f s of the first; scored on %s alone (%s)",
                self.eval_id,
                ", ".join(missing),
                self.eval_gather_s,
                ", ".join(sorted(self.eval_reports)),
                result.describe(),
            )
        elif len(self.eval_reports) > 1:
            log.info("evaluation %d over %d actors: %s", self.eval_id, len(self.eval_reports), result.describe())
        return result

    def _eval_target(self) -> int:
        return min(self.next_eval_at, self.cfg.train.env_steps)

    def _eval_due(self) -> bool:
        """The next evaluation's env steps are reached and the learner steps owed up to them are done."""
        target = self._eval_target()
        if self.counters.online_env_steps < target:
            return False
        owed = math.floor(target * self.cfg.train.learner_steps_per_env_step)
        return self.counters.learner_steps >= owed or not self._enough_data()

    def _start_eval(self, kind: str) -> None:
        self.eval_id += 1
        self.eval_kind = kind
        self.eval_started = now = time.monotonic()
        self.eval_reports = {}
        self.eval_awaited = {
            name for name, s in self.actors.items() if s.last_seen is not None and now - s.last_seen <= EVAL_ACTIVE_S
        }
        self._set_phase("eval")

    def _eval_done(self, report: EvalResult | None) -> None:
        if report is not None:
            row = EvalRow(
                env_steps=self.counters.env_steps,
                learner_steps=self.counters.learner_steps,
                wall_s=self._wall(),
                success_rate=report.success_rate,
                bc_action_fraction=report.bc_action_fraction,
                episodes=report.episodes,
                phase=self.eval_kind,
            )
            self.evallog.eval_row(row)
        self.eval_reports, self.eval_awaited = {}, set()
        if self.eval_kind == "bc":
            self.bc_success_rate = None if report is None else report.success_rate
            if self.qest_done:
                self._go_online()
            else:
                self._set_phase("qest_rollouts")
            return
        # The final evaluation is the one at train.env_steps; an earlier one overtaken by fast actors is not.
        final = (
            self.counters.online_env_steps >= self.cfg.train.env_steps
            and self._eval_target() >= self.cfg.train.env_steps
        )
        # Past this evaluation's steps (the final one's too: a run resumed with a larger budget evaluates next at the
        # next interval, not at the old end again).
        while self.next_eval_at <= self.counters.online_env_steps:
            self.next_eval_at += self.cfg.train.eval_every
        if final:
            self.done = True
            return
        self._set_phase("online")

    def _go_online(self) -> None:
        self.online_started = True
        self._set_phase("online")

    def _q_estimation(self) -> None:
        """Fit V_BC, initialise Q_RL and pre-train the actor on the BC rollouts, serving the sockets meanwhile."""
        self._set_phase("qest_fit")
        rollouts = list(self.rollouts)
        stats = run_q_estimation(
            self.agent,
            rollouts,
            self.cfg.qest,
            q_init=self.cfg.agent.q_init,
            actor_pretrain=True,
            seed=self.cfg.seed,
            progress=self._qest_progress,
        )
        successes = sum(r.terminated for r in rollouts)
        self.qest_stats = asdict(stats) | {"rollout_success_rate": successes / len(rollouts)}
        self.qest_done = True
        self.rollouts = []
        for stream in self.streams.values():
            stream.pending = []
        self._go_online()

    def _qest_progress(self, stage: str, step: int, total: int) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._serve(0)
        self._periodic(stage=f"{stage} {step}/{total}")

    def _finish(self) -> dict[str, Any]:
        """Tell the actors the run is done, checkpoint, and write summary.json and curves.png."""
        self.phase = "paused"
        period = self.cfg.actor.period_s
        quiet_s = max(DONE_QUIET_S, 2 * self.cfg.actor.chunk_steps * period)
        max_s = max(DONE_MAX_S, 2 * self.cfg.env.task.max_episode_steps * period)
        start = time.monotonic()
        while not self._stop.is_set():
            # Actors see `done` between episodes: the steps of the episode they are in still arrive and are acked.
            now = time.monotonic()
            quiet = now - max(self._last_transitions, start) >= quiet_s
            if now - start >= max_s or (
                quiet and not self._episodes_arriving(now, since=start - max_s, quiet_s=quiet_s)
            ):
                break
            self._publish_status(done=True)
            if now - self._last_stats >= STATS_EVERY_S:
                self._write_stats()  # phase paused: what the learner does now, not the evaluation it came from
            self._serve(min(self.cfg.transport.poll_ms, 100))
        self._checkpoint(LATEST)
        self._checkpoint("final")
        online = [r for r in self.evallog.rows if r.phase == "online"]
        summary = {
            "finished": True,
            **self._progress(),
            "learner_id": self.learner_id,
            "bc_success_rate": self.bc_success_rate,
            "final_success_rate": online[-1].success_rate if online else None,
            "best_success_rate": max(r.success_rate for r in online) if online else None,
            "qest_env_steps": self.counters.env_steps - self.counters.online_env_steps,
            "learner_steps_per_s": self.counters.learner_steps / max(self.learner_time, 1e-9),
            "actors": {name: stats.stored for name, stats in self.actors.items()},
            "q_estimation": self.qest_stats,
            "device": str(self.device),
        }
        write_json_atomic(self.out / "summary.json", summary)
        plot_curves(
            {self.cfg.agent.method: self.evallog.rows},
            self.out / "curves.png",
            bc_success=self.bc_success_rate,
            title=f"{self.cfg.agent.method}, seed {self.cfg.seed} (learner {self.learner_id})",
        )
        self._show(force=True)
        return summary

    def _episodes_arriving(self, now: float, *, since: float, quiet_s: float) -> bool:
        """Whether an actor heard from after `since` is still sending an episode: its newest chunk left one open, or
        came less than twice its own chunk interval ago (a slower actor than this config's actor.period_s says)."""
        for stream in self.streams.values():
            if stream.last_chunk_at is None or stream.last_chunk_at < since:
                continue
            if stream.episode_open or now - stream.last_chunk_at < max(quiet_s, 2 * stream.chunk_interval_s):
                return True
        return False

    # -- learning -----------------------------------------------------------------------------------------------------
    def _enough_data(self) -> bool:
        starts = 0 if self.cfg.agent.q_init else self.cfg.train.learning_starts
        return len(self.buffer) >= max(starts, 1)

    def _learner_step_due(self) -> bool:
        """Online, with enough data, and fewer learner steps done than online env steps * learner_steps_per_env_step."""
        if self.phase != "online" or not self._enough_data():
            return False
        owed = math.floor(self.counters.online_env_steps * self.cfg.train.learner_steps_per_env_step)
        return self.counters.learner_steps < owed

    def _learner_step(self) -> None:
        self.updater.submit(self._timed_update, self.sampler.next())
        stopped_at = None
        while self.updater.busy:  # meanwhile: receive, store and acknowledge transitions, broadcast the status
            self._serve(self._poll_ms())  # the poll also wakes when the update is done
            self._periodic(weights=False)
            if self._stop.is_set():
                stopped_at = stopped_at or time.monotonic()
                if self.updater.busy and time.monotonic() - stopped_at > UPDATE_STOP_WAIT_S:
                    raise _UpdateLeftRunning
        stats = self.updater.result()  # raises what the update raised (TrainingDiverged, ...)
        self.counters.learner_steps += 1
        if self.counters.learner_steps % TRAIN_SCALARS_EVERY == 0:
            self.evallog.scalars("train", stats.as_dict(), self.counters.env_steps)
        if self.counters.learner_steps % WEIGHTS_EVERY == 0:
            self._weights_tick()
        self._publish_due_weights()

    def _timed_update(self, batches: list) -> UpdateStats:
        """On the updater's thread: one learner step (critic updates + actor update) of the agent."""
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # the current CUDA device is per thread: this one's, as the service's
        t0 = time.perf_counter()
        stats = self.agent.update(batches)
        self.learner_time += time.perf_counter() - t0
        return stats

    # -- broadcasting and reporting -----------------------------------------------------------------------------------
    def _weights_tick(self) -> None:
        """A periodic broadcast falls due; one still waiting is folded into it (it would carry older weights)."""
        self.weights_folded += self._weights_due
        self._weights_due = True

    def _publish_due_weights(self) -> None:
        """Send the periodic broadcast that is due unless the previous one is still leaving (WEIGHTS_MAX_WAIT_S)."""
        if not self._weights_due:
            return
        in_flight = self._weights_frames.in_flight_s()
        if in_flight is None or in_flight >= WEIGHTS_MAX_WAIT_S:
            self._publish_weights()

    def _publish_weights(self) -> None:
        assert self.pub is not None
        self._weights_due = False
        self.weights_version = max(self.weights_version, 0) + 1
        frames = self._weights_frames.frames(
            version=self.weights_version, phase=self.phase, state=self.agent.acting_state()
        )
        self.pub.send_multipart(frames, zmq.NOBLOCK, copy=False)
        self._write_stats()  # the newest version is on disk before anything else happens (resume continues above it)

    def _publish_status(self, *, done: bool = False, stopping: bool = False) -> None:
        assert self.pub is not None
        c = self.counters
        status = Status(
            learner_id=self.learner_id,
            phase=self.phase,
            weights_version=self.weights_version,
            learner_steps=c.learner_steps,
            online_env_steps=c.online_env_steps,
            eval_id=self.eval_id if self.phase == "eval" else -1,
            done=done,
            stopping=stopping,
            online_budget=self.cfg.train.env_steps,
        )
        self.pub.send(to_wire(status), zmq.NOBLOCK)
        self._last_status = time.monotonic()

    def _periodic(self, *, stage: str | None = None, weights: bool = True) -> None:
        """Status broadcast, stats.json and the status line when due; a due weights broadcast too unless `weights` is
        False (while an update is changing the weights)."""
        if weights:
            self._publish_due_weights()
        now = time.monotonic()
        if now - self._last_status >= self.cfg.transport.status_every_s:
            self._publish_status()
        if now - self._last_stats >= STATS_EVERY_S:
            self._write_stats()
        self._warn_if_starved(now)
        self._warn_if_outrun(now)
        self._show(stage=stage)

    def _warn_if_outrun(self, now: float) -> None:
        """Say, every OUTRUN_WARN_S, when the actors have collected a whole evaluation interval more online steps than
        the learner's updates have caught up with (a learner slower than its actors, and no actor.max_env_steps_ahead
        holding them back): evaluations then come late or are skipped, and the actors act on old weights."""
        c, train = self.counters, self.cfg.train
        if self.phase != "online" or now - self._outrun_warned < OUTRUN_WARN_S:
            return
        ahead = c.online_env_steps - c.learner_steps / train.learner_steps_per_env_step
        if ahead < train.eval_every or not self._enough_data():
            return
        self._outrun_warned = now
        cap = self.cfg.actor.max_env_steps_ahead
        log.warning(
            "the actors are %.0f online env steps ahead of the learner's updates (train.learner_steps_per_env_step "
            "%g): evaluations come later than every train.eval_every (%d) steps, each placed at the env steps when it "
            "ran, and the actors act with older weights; %s",
            ahead,
            train.learner_steps_per_env_step,
            train.eval_every,
            "a faster learner (a GPU) or actor.max_env_steps_ahead holds them back"
            if cap is None
            else f"actor.max_env_steps_ahead {cap} is per actor: several actors together run further ahead",
        )

    def _last_heard(self, now: float) -> str:
        """Each actor id and how long ago it was last heard from, for a warning."""
        heard = [f"{name} {now - s.last_seen:.0f} s ago" for name, s in self.actors.items() if s.last_seen is not None]
        return ", ".join(heard) or "none"

    def _warn_if_starved(self, now: float) -> None:
        """Say, every STARVED_WARN_S, when the phase waits for transitions and none came for that long (every actor
        stopped, or none started), with each actor's last word."""
        if self.phase not in ("qest_rollouts", "online") or self._learner_step_due():
            return
        # Timed from the phase's start too: an evaluation or the fit before it sends no transitions, by design.
        quiet_s = now - max(self._last_transitions, self.start, self._phase_since)
        if quiet_s < STARVED_WARN_S or now - self._starved_warned < STARVED_WARN_S:
            return
        self._starved_warned = now
        log.warning(
            "phase %s: no transitions from any actor for %.0f s; waiting for them. Actors last heard: %s",
            self.phase,
            quiet_s,
            self._last_heard(now),
        )

    def stats(self) -> dict[str, Any]:
        """What stats.json holds: phase, weights version, counters, and per actor what it sent."""
        now = time.monotonic()
        c = self.counters
        return {
            "learner_id": self.learner_id,
            "phase": self.phase,
            "done": self.done,  # the run is complete (its phase is then paused: actors are told to stop)
            "eval_id": self.eval_id,
            "weights_version": self.weights_version,
            "learner_steps": c.learner_steps,
            "online_env_steps": c.online_env_steps,
            "env_steps": c.env_steps,
            "buffer_size": len(self.buffer),
            # Q-Estimation rollouts: collected so far, or (their list freed after the fit) how many it used.
            "rollouts": len(self.rollouts) if not self.qest_done else int(self.qest_stats.get("episodes", 0)),
            "actors": {
                name: {
                    "stored": s.stored,
                    "duplicates": s.duplicates,
                    "refused": s.refused,
                    "gaps": s.gaps,
                    "lost": s.lost,
                    "last_seen_s": None if s.last_seen is None else round(now - s.last_seen, 2),
                    # Each run of this actor id apart (an actor restarted with a new --out starts a new run).
                    "runs": {
                        run: {"stored": stream.stored, "acked_seq": stream.next_seq - 1}
                        for (actor, run), stream in self.streams.items()
                        if actor == name
                    },
                }
                for name, s in self.actors.items()
            },
            "refused_unidentified": self.refused_unidentified,
            # What reading the transition log back at --resume found: damaged records taken out (their transitions
            # lost, a copy of the file kept) and a torn tail cut; the log says which.
            "log_damaged_records": self.store.damaged_records,
            "log_lost_transitions": self.store.lost_transitions,
            "log_cut_transitions": self.store.cut_transitions,
            "weights_folded": self.weights_folded,
            "wall_s": self._wall(),
        }

    def _write_stats(self) -> None:
        write_json_atomic(self.out / "stats.json", self.stats())
        self._last_stats = time.monotonic()

    def _show(self, *, force: bool = False, stage: str | None = None) -> None:
        c = self.counters
        last = self.evallog.rows[-1] if self.evallog.rows else None
        fields: dict[str, Any] = {
            "phase": self.phase if stage is None else stage,
            "learner": f"{c.learner_steps} ({c.learner_steps / max(self.learner_time, 1e-9):.1f}/s)",
            "online": f"{c.online_env_steps}/{self.cfg.train.env_steps}",
            "stored": " ".join(f"{name}:{s.stored}" for name, s in self.actors.items()) or "-",
            "weights": self.weights_version,
            "eval": "-" if last is None else f"{last.success_rate:.2f} ({last.phase})",
            "wall": f"{self._wall():.0f}s",
        }
        if self.phase == "qest_rollouts":
            fields["rollouts"] = f"{len(self.rollouts)}/{self.cfg.qest.rollouts}"
        self.status.update(fields, force=force)

    # -- persistence --------------------------------------------------------------------------------------------------
    def _checkpoint(self, name: str) -> Path:
        self.store.sync()  # the log holds every transition the checkpoint counts (a failed write raises here)
        path = self.out / CHECKPOINTS / name
        manifest = {
            "kind": "q2rl_agent",
            "method": self.cfg.agent.method,
            "seed": self.cfg.seed,
            "counters": asdict(self.counters),
            "obs_spec": obs_lib.spec_to_json(self.obs_spec),
            "action_dim": self.action_dim,
            "config": self.cfg.model_dump(mode="json"),
            "has_bc": self.bc is not None,
            "learner": {
                "learner_id": self.learner_id,
                "phase": self.phase,
                "eval_id": self.eval_id,
                "eval_kind": self.eval_kind,
                "weights_version": self.weights_version,
                "qest_done": self.qest_done,
                "online_started": self.online_started,
                "next_eval_at": self.next_eval_at,
                "next_ckpt_at": self.next_ckpt_at,
                "bc_success_rate": self.bc_success_rate,
                "wall_s": self._wall(),
                "learner_time_s": self.learner_time,
                "q_estimation": self.qest_stats,
                "next_seq": {f"{a}@{r}": s.next_seq for (a, r), s in self.streams.items()},
            },
            **checkpoint_bc_entry(self.fingerprint.get(BC_FINGERPRINT_KEY)),  # hashed at start
        }
        save_checkpoint(
            path, tensors=self.agent.network_state(), manifest=manifest, optimizers=self.agent.optimizer_states()
        )
        if self.bc is not None:
            save_bc(self.bc, path / "bc")
        return path

    def _restore(self) -> None:
        """Networks, optimisers and phase from the newest readable checkpoint (latest, else final, else the newest
        step_*; a warning says which and why); buffer and sequence counters from the store."""
        # A complete run is refused on its final checkpoint's word, before every log is read back (minutes for a
        # long image run); the logs' own count decides below where that checkpoint cannot be read.
        self._refuse_if_complete(self._final_online_env_steps())
        restored = self._restore_checkpoint()
        if restored is None and self.eval_id >= 0:
            # No checkpoint: the networks start over, but actors may have answered evaluations of the earlier run.
            self.eval_id += EVAL_ID_JUMP_ON_RESUME
        self._restore_stats()
        try:
            chunks = self.store.read_back()
        except StoreError as err:
            raise LearnerError(f"cannot resume {self.out}: {err}") from err
        for chunk in chunks:
            stream = self.streams.setdefault((chunk.actor_id, chunk.run_id), Stream())
            self._ingest(chunk, stream)
            self.actors.setdefault(chunk.actor_id, ActorStats()).stored += chunk.count
        if restored is not None:
            self._check_log_against(restored)
        self._refuse_if_complete(self.counters.online_env_steps)
        if self.phase == "paused":  # stopped while finishing, after the final evaluation (eval.csv has its row)
            if self.counters.online_env_steps >= self.cfg.train.env_steps:
                self.done = True  # finish at once: no evaluation to wait for, no actor needed
            else:  # resumed with a larger train.env_steps: train on
                self.phase, self.eval_kind = "online", "online"
        log.info(
            "resumed %s: phase %s, %d transitions in %d streams, %d learner steps, weights version %d",
            self.out,
            self.phase,
            self.counters.env_steps,
            len(self.streams),
            self.counters.learner_steps,
            self.weights_version,
        )

    def _final_online_env_steps(self) -> int | None:
        """The online env steps the final checkpoint's manifest counts; None without a final checkpoint or where its
        manifest cannot be read."""
        try:
            manifest = json.loads((self.out / CHECKPOINTS / "final" / MANIFEST_FILE).read_text())
            return int(manifest["counters"]["online_env_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _refuse_if_complete(self, online: int | None) -> None:
        """LearnerError when the run has its final checkpoint and `online` env steps reach train.env_steps."""
        budget = self.cfg.train.env_steps
        if online is not None and (self.out / CHECKPOINTS / "final").is_dir() and online >= budget:
            self.store.close()
            raise LearnerError(
                f"the run in {self.out} is complete ({CHECKPOINTS}/final; {online} online env steps of "
                f"train.env_steps {budget}): nothing to resume. To train on, resume with a larger budget (--set "
                "train.env_steps=...); to start over, choose another --out"
            )

    def _restore_checkpoint(self) -> dict[str, Any] | None:
        """Load the newest checkpoint that reads and restores; its manifest's learner state, or None when the run
        has no checkpoint yet. CheckpointError, naming each one's problem, when none of several can be restored."""
        root = self.out / CHECKPOINTS
        others = [*root.glob("step_*"), root / "final"] if root.is_dir() else []
        # After latest: the others newest first by the learner steps their manifests count (unreadable ones last).
        others = sorted((p for p in others if p.is_dir()), key=_checkpoint_progress, reverse=True)
        candidates = [path for path in (root / LATEST, *others) if path.is_dir()]
        problems: list[str] = []
        for path in candidates:
            try:
                tensors, manifest, optimizers = load_checkpoint(path)
                state = _resume_state(manifest, path)
                self.agent.load_network_state(tensors)
                changed = self.agent.load_optimizer_states(optimizers)
            except (CheckpointError, KeyError, ValueError, RuntimeError) as err:  # load_state_dict: RuntimeError
                problems.append(f"{path.name}: {err}")
                log.warning("cannot resume from checkpoint %s: %s", path, err)
                continue
            if path.name != LATEST:
                log.warning(
                    "resuming from checkpoint %s (learner step %d), not %s: %s",
                    path,
                    state["learner_steps"],
                    LATEST,
                    problems[0] if problems else "it is missing",
                )
            if changed:
                log.warning("resumed with the config's learning rates, not the checkpoint's: %s", ", ".join(changed))
            self.counters.learner_steps = state["learner_steps"]
            self.phase, self.eval_kind = state["phase"], state["eval_kind"]
            # Evaluation ids jump on every resume: the killed learner may have asked for (and an actor answered)
            # evaluations after its last checkpoint; reusing their ids would leave the actors thinking them done.
            self.eval_id = state["eval_id"] + EVAL_ID_JUMP_ON_RESUME
            self.weights_version = state["weights_version"]
            self.qest_done, self.online_started = state["qest_done"], state["online_started"]
            self.next_eval_at, self.next_ckpt_at = state["next_eval_at"], state["next_ckpt_at"]
            self.bc_success_rate = state["bc_success_rate"]
            self.wall_offset, self.learner_time = state["wall_s"], state["learner_time_s"]
            self.qest_stats = state["q_estimation"]
            return state
        if problems:
            raise CheckpointError(
                f"cannot resume {self.out}: no checkpoint can be restored ({'; '.join(problems)}); move "
                f"{root} aside to resume with new networks from the stored transitions"
            )
        return None

    def _check_log_against(self, state: dict[str, Any]) -> None:
        """When the transition log holds less of a stream than the checkpoint counted, transitions the learner had
        acknowledged were lost from the log, and their actor no longer keeps them: say so (error), and continue the
        stream where the checkpoint saw it, so that the actor's next chunks are stored rather than held at the gap."""
        for name, next_seq in state["next_seq"].items():
            actor_id, _, run_id = name.partition("@")
            stream = self.streams.setdefault((actor_id, run_id), Stream())
            if stream.next_seq < next_seq:
                log.error(
                    "the transition log of actor %s run %s ends at %d, but the checkpoint counted %d: %d acknowledged "
                    "transitions were lost from %s; the stream continues at %d",
                    actor_id,
                    run_id,
                    stream.next_seq,
                    next_seq,
                    next_seq - stream.next_seq,
                    self.out / "buffer",
                    next_seq,
                )
                self.actors.setdefault(actor_id, ActorStats()).lost += next_seq - stream.next_seq  # in stats.json
                stream.skip_to(next_seq)

    def _restore_stats(self) -> None:
        """Counters kept only in stats.json: the newest weights version broadcast, duplicates, refusals, gaps and the
        transitions actors said they lost."""
        path = self.out / "stats.json"
        try:
            saved = json.loads(path.read_text())
            if not isinstance(saved, dict):
                raise TypeError(f"holds a {type(saved).__name__}, not an object")
            weights_version = int(saved.get("weights_version", -1))
            asked = int(saved.get("eval_id", -1))
            refused = int(saved.get("refused_unidentified", 0))
            actors = {
                str(name): {key: int(entry.get(key, 0)) for key in ("duplicates", "refused", "gaps", "lost")}
                for name, entry in (saved.get("actors") or {}).items()
            }
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as err:  # JSONDecodeError too
            log.warning("%s cannot be read (%s): its counters start over; the stored transitions are not affected",
                        path, err)  # fmt: skip
            return
        self.weights_version = max(self.weights_version, weights_version)
        # The last evaluation this run asked for may be newer than the checkpoint's (asked after it, or by an earlier
        # resume from the same checkpoint): ids go on above both, so no actor takes a new one for one it answered.
        if asked >= 0:
            self.eval_id = max(self.eval_id, asked + EVAL_ID_JUMP_ON_RESUME)
        self.refused_unidentified = refused
        for name, entry in actors.items():
            stats = self.actors.setdefault(name, ActorStats())
            for key, value in entry.items():
                setattr(stats, key, value)


def _checkpoint_progress(path: Path) -> tuple[int, str]:
    """Sort key of a checkpoint by the learner steps its manifest counts (-1 where it cannot be read), then name."""
    try:
        steps = int(json.loads((path / MANIFEST_FILE).read_text())["counters"]["learner_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        steps = -1
    return steps, path.name


def _discard_new_run(out: Path, existed: bool) -> None:
    """Remove what a new run wrote into `out` (which was empty or absent before), so the same command can run again."""
    if not out.is_dir():
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def run_learner(
    cfg: RunConfig,
    out: Path,
    *,
    bc_dir: Path | None = None,
    demos: Path | None = None,
    resume: bool = False,
    learner_id: str = "learner",
    quiet: bool = False,
) -> int:
    """The `robot-rl learner` command: run the service until done (0) or SIGINT/SIGTERM (130, resumable)."""
    reuse_freed_memory()  # each chunk's megabyte-sized buffers are reused, not faulted in again
    out = Path(out)
    existed = out.exists()
    if existed and not out.is_dir():
        raise LearnerError(f"run directory {out} is a file")
    with DirectoryLock(out, what="learner"):  # before anything reads or repairs the run's files
        try:
            return _run_locked(cfg, out, existed, bc_dir=bc_dir, demos=demos, resume=resume, learner_id=learner_id,
                               quiet=quiet)  # fmt: skip
        except BaseException:
            if out.is_dir() and holds_only_the_lock(out):  # refused before it wrote anything: leave no trace
                _discard_new_run(out, existed)
            raise


def _run_locked(
    cfg: RunConfig,
    out: Path,
    existed: bool,
    *,
    bc_dir: Path | None,
    demos: Path | None,
    resume: bool,
    learner_id: str,
    quiet: bool,
) -> int:
    service = LearnerService(cfg, out, bc_dir=bc_dir, demos=demos, resume=resume, learner_id=learner_id, quiet=quiet)
    stop = threading.Event()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in stop_signals():
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        summary = service.run(stop)
    except LearnerError:
        if not resume and service.store.is_empty():  # a new run that never started (its port taken): leave no trace
            _discard_new_run(out, existed)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not summary["finished"]:
        print(
            f"robot-rl learner: stopped in phase {summary['phase']} after {summary['online_env_steps']} online env "
            f"steps; run directory {out} (continue with --resume)",
            file=sys.stderr,
        )
        return 130
    bc, final = summary["bc_success_rate"], summary["final_success_rate"]
    print(
        f"{summary['method']} seed {summary['seed']}: BC success {'-' if bc is None else f'{bc:.2f}'}, final "
        f"{'-' if final is None else f'{final:.2f}'} after {summary['env_steps']} env steps, "
        f"{summary['learner_steps']} learner steps, {summary['wall_s']:.0f} s; run directory {out}"
    )
    return 0
