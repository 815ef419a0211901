"""`robot-rl replay LOG`: run a recorded actor episode back through mock hardware and re-check every decision.

The inputs are the episode log the actor wrote (`DIR/episodes/episode_*.hdf5`), the weights archive it filled
(`DIR/weights/`, see `weights_archive.py`), the BC policy it acted with (the episode's `bc_dir` attribute, else
`DIR/actor_state.json`) and its resolved config (`DIR/config.yaml`). `--checkpoint` replaces the archive: another
archive directory, or a learner checkpoint (`manifest.json` + `model.safetensors`) whose acting tensors then serve
every gated step whatever version it logged. A log that never acted with weights (every step `weights_version` -1:
BC-only episodes, an actor run with `--learner none`) needs neither: its actor may never have written an archive.
The config must build the networks the weights were saved from (same sizes, same BC policy): weights that do not
fit, or a BC policy that observes or acts otherwise than the config, are refused before they are used.

Per logged step t, in the order the actor did it:

1. Observation. A `ReplayRobot` (the `Robot` twin fed from the log) reports the logged measured pose
   (`extras/measured`, the relative pose the actor's TargetMapper used) as a world pose; the real `RobotEnv` turns it
   into the observation. Field `obs` compares that with the logged `obs` (keys the env does not produce, such as
   camera images, are taken from the log as recorded). The logged observation is what the policies are fed.
2. Decision, for a gated step (`weights_version` >= 0), with that version's acting state from the archive:
   - a_BC is the logged proposal (the BC sample is random; its log entry is the source of truth). When the config
     asks for the BC mode, the mode is recomputed and compared (`bc_action`).
   - a_RL is the RL actor's mode, recomputed and compared (`rl_action`), when the step acted in mode (evaluation
     episodes always do, others as `agent.rl_action` says); a sampled a_RL is taken from the log and only re-scored.
   - `q_bc` = Q^_BC(s, a_BC) with the archived V_BC and the BC policy (gating q2rl), or min_k Q_RL_k(s, a_BC)
     (gating shared); `q_rl` = min_k Q_RL_k(s, a_RL); `use_bc` = Q2RLAgent.gate (q_bc > q_rl), recomputed from the
     replayed values; `action` = the chosen proposal, clipped as the actor clips it.
   A BC-only step (`weights_version` -1) checks that the executed action is its clipped BC proposal and that use_bc
   was set (and recomputes the proposal when the config asks for the BC mode).
3. Safety mapping. The replayed action goes through `RobotEnv.step` (TargetMapper, safety box, `relative_to_world`,
   `ReplayRobot.command`); `target` and `command` are compared with the log. Afterwards the mapper is re-seeded from
   the logged target, so each step is checked from the state the robot really was in and a divergence is reported
   at the step it arises, not inherited by every later step.
4. Operator. The logged operator events are released at their steps by the `ReplayedOperator` and applied as the
   actor applies them (success: terminated with reward 1; failure or quit: truncated); with the env's step limit
   they decide `done` = (terminated, truncated, reward), compared exactly with the log. The replayed task never
   reports success by itself: on the robot the operator judges it, and in simulation the scripted operator turned
   the detector's success into the logged SUCCESS event.

Floats compare within `atol` (absolute; NaN equals NaN); decisions and `done` compare exactly. The report has one
line per diverging step and field (logged, replayed), then a summary: steps, divergent steps per field, the first
divergence. `run_replay` returns 0 when nothing diverged, 1 when something did, 2 when the input is unusable (an
unreadable log, a weights version missing from the archive, no BC policy or config, weights or a BC policy that do
not fit the config's networks): the message names the file. An episode that ended on a robot or camera fault is
replayed up to its last logged step (the step the fault cut short has no next observation and is not a logged step;
a note names the fault), as is one cut short by an actor stopped or killed in it (a note says so); a log whose
episode faulted at reset has no step to replay (exit 2, naming the fault).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import torch

from robot_rl import obs as obs_lib
from robot_rl.actor.weights_archive import WeightsArchive, WeightsArchiveError
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import BC_FINGERPRINT_KEY, BCCheckpointError, BCPolicy, bc_fingerprint, load_bc
from robot_rl.checkpoint import CheckpointError, load_checkpoint
from robot_rl.config import STATE_OBS_KEY, ConfigError, RunConfig, load_config
from robot_rl.episodes import (
    FAULT_ATTR,
    Episode,
    EpisodeFileError,
    fault_of,
    read_env_args,
    read_episodes,
    read_episodes_without_steps,
)
from robot_rl.hardware.camera import CameraError, Frame
from robot_rl.hardware.env import OperatorJudgedTask, RobotEnv
from robot_rl.hardware.interfaces import ClosesOnExit, Pose, RobotState
from robot_rl.hardware.operator import EVENT_CODES, EVENTS_BY_CODE, ReplayedOperator, apply_operator_events
from robot_rl.hardware.safety import relative_to_world
from robot_rl.rollout import clip_action
from robot_rl.wire import transition_spec

FIELDS = ("obs", "bc_action", "rl_action", "q_bc", "q_rl", "use_bc", "action", "target", "command", "done")
"""Compared per step, in this order (the order the actor produces them)."""
EXACT_FIELDS = frozenset({"use_bc", "done"})
DEFAULT_ATOL = 1e-5
# Env fields of how the actor reached its robot and operator: the replay has its own, so they may differ.
_LINK_FIELDS = frozenset({"robot", "franka", "operator"})
REQUIRED_EXTRAS = ("bc_action", "rl_action", "q_bc", "q_rl", "use_bc", "weights_version", "command", "target",
                   "operator_event")  # fmt: skip
# Per step: the shape of each extra the replay reads, and the kinds of dtype it may have (f float, i/u integer, b bool).
EXTRA_FORMS = {
    "bc_action": ((6,), "f"), "rl_action": ((6,), "f"), "q_bc": ((), "f"), "q_rl": ((), "f"), "use_bc": ((), "bui"),
    "weights_version": ((), "iu"), "command": ((7,), "f"), "target": ((6,), "f"), "operator_event": ((), "iu"),
    "measured": ((6,), "f"),
}  # fmt: skip


Check = Callable[[int, str, np.ndarray, np.ndarray], None]
"""Records a divergence when logged and replayed values of (step, field) differ."""


class ReplayInputError(ValueError):
    """The replay cannot start: unreadable log, missing weights version, BC policy or config. Names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Mock hardware fed from the log
# ----------------------------------------------------------------------------------------------------------------
class ReplayCamera(ClosesOnExit):
    """The camera twin of a log: `read()` returns the image set with `feed`, the one the actor observed (already
    cropped and resized, as the log keeps it)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._frame: Frame | None = None

    @property
    def name(self) -> str:
        return self._name

    def feed(self, image: np.ndarray) -> None:
        """The next `read()` returns this image."""
        number = 0 if self._frame is None else self._frame.frame_number + 1
        image = np.ascontiguousarray(image, np.uint8)
        self._frame = Frame(image=image, timestamp_s=0.1 * number, frame_number=number, received_s=time.monotonic())

    def read(self) -> Frame:
        if self._frame is None:
            raise CameraError(f"camera {self._name}: the replay fed no image")
        return self._frame

    read_raw = read

    def close(self) -> None:
        self._frame = None


class ReplayRobot:
    """The `Robot` twin of a log: `state()` reports the pose set with `feed`; `command` returns what it was given
    (unit quaternion), as an arm that clips nothing; `move_to` only records (the log says where the arm was)."""

    def __init__(self, reference: Pose) -> None:
        self.reference = reference
        self._pose = Pose(pos=np.asarray(reference.pos, np.float64).copy(), quat=np.asarray(reference.quat).copy())
        self.commands = 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def feed(self, measured: np.ndarray) -> None:
        """The next `state()` reports this relative pose (6-vector around the reference)."""
        self._pose = relative_to_world(np.asarray(measured, np.float64), self.reference)

    def state(self) -> RobotState:
        return RobotState(ee_pos=self._pose.pos.copy(), ee_quat=self._pose.quat.copy(), joint_pos=np.zeros(7),
                          joint_vel=np.zeros(7), time=0.0)  # fmt: skip

    def command(self, target_pos: np.ndarray, target_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.commands += 1
        quat = np.asarray(target_quat, np.float64)
        return np.asarray(target_pos, np.float64).copy(), quat / np.linalg.norm(quat)

    def move_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        return None

    def stop(self) -> None:
        return None

    def recover(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------------------------
# Weights by version
# ----------------------------------------------------------------------------------------------------------------
class ActingWeights:
    """Acting-state tensors for a logged weights version: from a weights archive, or one learner checkpoint."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.fixed: dict[str, torch.Tensor] | None = None
        self.archive: WeightsArchive | None = None
        if (directory / "manifest.json").is_file() and (directory / "model.safetensors").is_file():
            try:
                tensors, _, _ = load_checkpoint(directory)
            except CheckpointError as exc:
                raise ReplayInputError(str(exc)) from exc
            prefixes = tuple(f"{name}." for name in Q2RLAgent.ACTING_MODULES)
            self.fixed = {k: v for k, v in tensors.items() if k.startswith(prefixes)}
        elif (directory / "checkpoints").is_dir():  # a learner's (or train's) run directory, not one checkpoint
            names = sorted(p.name for p in (directory / "checkpoints").iterdir() if (p / "manifest.json").is_file())
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise ReplayInputError(
                f"--checkpoint {directory} is a run directory; pass one of its checkpoints, "
                f"{directory / 'checkpoints'}/<name> ({shown})"
            )
        elif directory.is_dir():
            try:
                self.archive = WeightsArchive(directory)
            except WeightsArchiveError as exc:
                raise ReplayInputError(str(exc)) from exc
        else:
            raise ReplayInputError(f"weights archive {directory} does not exist (pass --checkpoint DIR)")

    def describe(self) -> str:
        return f"checkpoint {self.directory}" if self.fixed is not None else f"weights archive {self.directory}"

    def describe_version(self, version: int) -> str:
        """Where the tensors serving logged `version` come from, for messages."""
        if self.fixed is not None:
            return f"the weights of checkpoint {self.directory} (serving logged version {version})"
        return f"weights version {version} of weights archive {self.directory}"

    def check(self, versions: list[int]) -> None:
        """Refuse now, before any step is replayed, when one of `versions` cannot be loaded."""
        if self.archive is not None:
            for version in versions:
                try:
                    self.archive.manifest(version)
                except WeightsArchiveError as exc:
                    raise ReplayInputError(str(exc)) from exc

    def load(self, version: int) -> dict[str, torch.Tensor]:
        if self.fixed is not None:
            return self.fixed
        assert self.archive is not None
        try:
            return self.archive.load(version)
        except WeightsArchiveError as exc:
            raise ReplayInputError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Divergence:
    """One field of one step that the replay computed differently from the log."""

    episode: int
    step: int
    field: str
    logged: np.ndarray
    replayed: np.ndarray

    def line(self, *, with_episode: bool = False) -> str:
        where = f"demo_{self.episode} step {self.step}" if with_episode else f"step {self.step}"
        logged, replayed = np.asarray(self.logged), np.asarray(self.replayed)
        if logged.size > _LINE_VALUES and logged.shape == replayed.shape:  # an image: where and how much, not pixels
            x, y = logged.astype(np.float64), replayed.astype(np.float64)
            with np.errstate(invalid="ignore"):
                differ = ~((x == y) | (np.isnan(x) & np.isnan(y)))
            gap = np.abs(x - y)[differ]
            first = tuple(int(i) for i in np.argwhere(differ)[0]) if differ.any() else ()
            return (
                f"{where} {self.field}: {int(differ.sum())} of {logged.size} values of {logged.dtype}"
                f"{list(logged.shape)} differ, by up to {np.nanmax(gap) if gap.size else 0:.7g}, first at {list(first)}"
            )
        line = f"{where} {self.field}: logged {_fmt(logged)} replayed {_fmt(replayed)}"
        if _fmt(logged) == _fmt(replayed) and logged.shape == replayed.shape:  # a difference below the shown digits
            with np.errstate(invalid="ignore"):
                gap = np.nanmax(np.abs(logged.astype(np.float64) - replayed.astype(np.float64)))
            line += f" (differ by {gap:.3g}, below the digits shown)"
        return line


# A divergence of more values than this (an image) is summarised on its line instead of printed whole.
_LINE_VALUES = 64


def _fmt(value: np.ndarray) -> str:
    arr = np.asarray(value)
    if arr.ndim == 0:
        return str(arr.item()) if arr.dtype.kind == "b" else f"{float(arr):.7g}"
    return np.array2string(arr, precision=7, separator=", ", max_line_width=10_000)


@dataclass
class ReplayReport:
    """What a replay found: every divergence, the steps replayed, notes about the inputs."""

    log: Path
    steps: int = 0
    gated_steps: int = 0
    episodes: int = 0
    versions: list[int] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    compared: set[str] = field(default_factory=set)  # the fields the replay computed and compared, at any step

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def per_field(self) -> dict[str, int]:
        """Divergent steps per field, in FIELDS order (an image observation's `obs/<camera>` after `obs`; fields
        without divergence left out)."""
        counts: dict[str, int] = {}
        for d in self.divergences:
            counts[d.field] = counts.get(d.field, 0) + 1
        return dict(sorted(counts.items(), key=lambda item: _field_order(item[0])))

    @property
    def first(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None

    def divergent_steps(self) -> int:
        return len({(d.episode, d.step) for d in self.divergences})

    def lines(self) -> Iterator[str]:
        many = self.episodes > 1
        for d in self.divergences:
            yield d.line(with_episode=many)
        for note in self.notes:
            yield f"note: {note}"
        versions = f"weights versions {self.versions[0]}..{self.versions[-1]}" if self.versions else "BC only"
        yield (
            f"replayed {self.steps} steps ({self.gated_steps} gated, {versions}) of {self.log} "
            f"in {self.wall_s:.2f} s: {self.divergent_steps()} divergent steps"
        )
        if self.divergences:
            counts = ", ".join(f"{name} {n}" for name, n in self.per_field().items())
            first = self.divergences[0]
            where = f"demo_{first.episode} step {first.step}" if many else f"step {first.step}"
            yield f"divergent steps per field: {counts}"
            yield f"first divergence: {where} field {first.field}"
        else:
            compared = sorted(self.compared, key=_field_order)
            reproduced = [name for name in compared if not name.startswith("obs/")]
            yield f"no divergence: the replay reproduces every logged {', '.join(reproduced) or 'nothing'}"
            if fed := [name for name in compared if name.startswith("obs/")]:
                yield (
                    f"fed from the log: {', '.join(fed)} (camera images are the replay's inputs, not reproduced: it "
                    "checks only that they reach the policies as logged)"
                )
            groups = {name.split("/")[0] for name in self.compared}
            for name in FIELDS:
                if name not in groups:
                    yield f"not compared: {name} ({_NOT_COMPUTED.get(name, 'not computed at any step')})"


# Why a field was computed at no step of a replay.
_NOT_COMPUTED = {
    "bc_action": "the BC proposals were sampled (agent.bc_action: sample): a sample is taken from the log, not redrawn",
    "rl_action": "no step acted with the RL policy's mode: the RL proposals were sampled (taken from the log), or "
    "the steps were BC-only",
    **dict.fromkeys(("q_bc", "q_rl"), "every step was BC-only (no weights yet): no gating values"),
}


def _field_order(name: str) -> tuple[int, str]:
    """Sort key of a report field: FIELDS order, `obs/<camera>` right after `obs`."""
    group = name.split("/")[0]
    return (FIELDS.index(group) if group in FIELDS else len(FIELDS), name)


# ----------------------------------------------------------------------------------------------------------------
# Loading the inputs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ReplayInputs:
    """Everything a replay needs besides the episodes: config, BC policy, weights."""

    cfg: RunConfig
    bc: BCPolicy
    weights: ActingWeights | None  # None: the log never acted with weights (BC only) and no --checkpoint was given
    config_path: Path | None = None  # where cfg and bc came from, for messages
    bc_path: Path | None = None


def load_inputs(
    log: Path,
    episodes: list[Episode],
    *,
    checkpoint: Path | None = None,
    config: Path | None = None,
    bc_dir: Path | None = None,
) -> ReplayInputs:
    """The run's config, BC policy and weights for `log`; defaults are the actor directory's (LOG/../..)."""
    actor_dir = log.resolve().parent.parent
    config_path = config or actor_dir / "config.yaml"
    if not config_path.is_file():
        raise ReplayInputError(f"config {config_path} does not exist (pass --config C)")
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise ReplayInputError(f"config {config_path}: {exc}") from exc
    state = _actor_state(actor_dir)
    bc_path = bc_dir or _recorded_bc_dir(actor_dir, episodes, state)
    try:
        bc = load_bc(bc_path)
    except BCCheckpointError as exc:
        raise ReplayInputError(f"BC policy {bc_path}: {exc}") from exc
    acted_with = state.get("bc_weights")  # the fingerprint the actor recorded (actors since it was recorded)
    if _bc_fits(bc, cfg) and isinstance(acted_with, str) and bc_fingerprint(bc)[BC_FINGERPRINT_KEY] != acted_with:
        given = " (--bc)" if bc_dir is not None else ""
        raise ReplayInputError(
            f"BC policy {bc_path}{given} is not the one this actor acted with (its weights differ from those "
            f"{actor_dir / 'actor_state.json'} recorded; trained again since?): pass the policy it acted with as --bc"
        )
    if not gated_versions(episodes):
        # BC only: no step acted with weights, so there are none to load (an actor without a learner writes none;
        # a --checkpoint given is not opened, and the report says it was not used).
        return ReplayInputs(cfg=cfg, bc=bc, weights=None, config_path=config_path, bc_path=bc_path)
    archive = checkpoint or actor_dir / "weights"  # the archive next to the log, wherever the directory went
    if checkpoint is None and not archive.is_dir():
        archive = Path(str(episodes[0].attrs.get("weights_archive", archive)))  # an archive kept elsewhere
    return ReplayInputs(cfg=cfg, bc=bc, weights=ActingWeights(archive), config_path=config_path, bc_path=bc_path)


def _bc_fits(bc: torch.nn.Module, cfg: RunConfig) -> bool:
    """Whether the BC policy takes the observations and actions of the config's env (the Replayer says it when not)."""
    spec = transition_spec(cfg)
    return (bc.obs_spec, bc.action_dim) == (obs_lib.check_spec(spec.obs), spec.action_dim)


def _actor_state(actor_dir: Path) -> dict:
    """actor_state.json of an actor directory; empty where it is missing or unreadable."""
    try:
        state = json.loads((actor_dir / "actor_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def gated_versions(episodes: list[Episode]) -> list[int]:
    """The weights versions the logged steps acted with, ascending (empty for a BC-only log: every version -1)."""
    return sorted({int(v) for ep in episodes for v in ep.extras["weights_version"] if int(v) >= 0})


def _recorded_bc_dir(actor_dir: Path, episodes: list[Episode], state: dict) -> Path:
    """The BC policy the log names (episode attr bc_dir where it still exists, else actor_state.json's `state`)."""
    recorded = episodes[0].attrs.get("bc_dir")
    if isinstance(recorded, str) and (Path(recorded) / "bc.json").is_file():
        return Path(recorded)
    state_path = actor_dir / "actor_state.json"
    if isinstance(state.get("bc_dir"), str):
        return Path(state["bc_dir"])
    if isinstance(recorded, str):
        return Path(recorded)
    raise ReplayInputError(
        f"no BC policy recorded for this log (episode attr bc_dir, {state_path}): pass --checkpoint/--bc explicitly"
    )


def _fault_line(attrs: dict) -> str:
    """How the episode with these attrs ended on a fault ("faulted in step 9: CameraError: ..."), or a placeholder."""
    try:
        fault = fault_of(attrs)
    except ValueError as exc:
        return f"holds an unreadable fault record ({exc})"
    return fault.describe() if fault is not None else "ended before its first step"


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def env_notes(log: Path, inputs: ReplayInputs) -> list[str]:
    """A note naming the env fields in which the replay's config differs from the one the log was recorded with
    (its env_args): divergences that follow from them are the config's, not the actor's. The robot's connection
    and the operator are left out (the replay has its own)."""
    try:
        recorded = read_env_args(log).get("config")
    except EpisodeFileError:
        return []
    if not isinstance(recorded, dict):
        return []
    ours = _flat(inputs.cfg.env.model_dump(mode="json"))
    theirs = _flat(recorded)
    fields = sorted(
        k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k) and k.split(".")[0] not in _LINK_FIELDS
    )
    if not fields:
        return []
    shown = "; ".join(f"env.{k}: config {ours.get(k, '-')}, log {theirs.get(k, '-')}" for k in fields[:6])
    more = f" and {len(fields) - 6} more" if len(fields) > 6 else ""
    return [
        f"config {inputs.config_path} differs from the env the log was recorded with (divergences may follow from "
        f"it): {shown}{more}"
    ]


def fault_notes(episodes: list[Episode]) -> list[str]:
    """One note per episode that ended on a fault (the step it cut short is not replayed: it is not a logged step)
    and per episode cut short otherwise (the actor stopped or killed in it): its logged steps are all there is."""
    notes = []
    for i, ep in enumerate(episodes):
        if FAULT_ATTR in ep.attrs:
            notes.append(f"demo_{i} {_fault_line(ep.attrs)}")
        elif ep.attrs.get("interrupted"):
            notes.append(
                f"demo_{i} was cut short after {len(ep)} logged steps (its actor stopped or was killed in it): "
                "those steps are replayed, the episode's end is not in the log"
            )
    return notes


def read_log(log: Path) -> list[Episode]:
    """The episodes of an actor log; ReplayInputError when the file is unreadable or not an actor log."""
    if log.is_dir():
        folder = log / "episodes" if (log / "episodes").is_dir() else log
        files = sorted(folder.glob("episode_*.hdf5"))
        which = f"one of its {len(files)} episode files, e.g. {files[-1]}" if files else "an episode file"
        raise ReplayInputError(f"episode log {log} is a directory; replay takes {which}")
    try:
        episodes = read_episodes(log, warn=lambda line: None)  # a cut episode gets the report's own note
    except EpisodeFileError as exc:
        raise ReplayInputError(f"episode log {exc}") from exc
    if not episodes:
        faults = [_fault_line(attrs) for attrs in read_episodes_without_steps(log)]
        raise ReplayInputError(
            f"episode log {log}: no episode with a recorded step" + "".join(f" (it {line})" for line in faults)
        )
    for i, ep in enumerate(episodes):
        missing = [name for name in REQUIRED_EXTRAS if name not in ep.extras]
        if missing:
            raise ReplayInputError(f"episode log {log}: demo_{i} lacks extras {missing}: not an actor episode log")
        for name, (shape, kinds) in EXTRA_FORMS.items():
            array = ep.extras.get(name)
            if array is not None and (array.shape[1:] != shape or array.dtype.kind not in kinds):
                raise ReplayInputError(
                    f"episode log {log}: demo_{i} extras/{name} is {array.dtype}{list(array.shape[1:])} per step, an "
                    f"actor logs {'/'.join(_KIND_NAMES[k] for k in kinds)}{list(shape)} (damaged or edited?)"
                )
        unknown = sorted({int(c) for c in ep.extras["operator_event"]} - set(EVENT_CODES.values()))
        if unknown:
            raise ReplayInputError(
                f"episode log {log}: demo_{i} extras/operator_event holds codes {unknown} that no operator event has "
                f"(known: {sorted(EVENT_CODES.values())}; damaged, or written by a newer robot-rl?)"
            )
    return episodes


_KIND_NAMES = {"f": "float", "i": "int", "u": "uint", "b": "bool"}


# ----------------------------------------------------------------------------------------------------------------
# The replay
# ----------------------------------------------------------------------------------------------------------------
class Replayer:
    """Holds the mock env and the agent across episodes; `replay_episode` checks one episode step by step."""

    def __init__(self, inputs: ReplayInputs, *, atol: float = DEFAULT_ATOL) -> None:
        from robot_rl.hardware.sim.scene import build_scene

        cfg = inputs.cfg
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        self.cfg, self.bc, self.weights, self.atol = cfg, inputs.bc, inputs.weights, atol
        config_name = f"config {inputs.config_path}" if inputs.config_path is not None else "the config"
        bc_name = f"BC policy {inputs.bc_path}" if inputs.bc_path is not None else "the BC policy"
        self._networks = f"the networks of {config_name} (with {bc_name})"
        # Both the sim twin and the franky env place the cell by this reference: commands are world poses around it.
        reference = build_scene(cfg.env.task).reference
        self.robot = ReplayRobot(reference)
        self.cameras = [ReplayCamera(camera.name) for camera in cfg.env.cameras]  # fed the logged images
        self.env = RobotEnv(
            robot=self.robot,
            task=OperatorJudgedTask(reference),
            config=cfg.env,
            wait=lambda seconds: None,
            cameras=self.cameras,
        )
        self.env_keys = list(self.env.observation_space.spaces)
        # The policies observe what the config's env observes (cameras included); the replay env rebuilds the state.
        self.obs_spec = transition_spec(cfg).obs
        action_dim = int(self.env.action_space.shape[0])
        if not _bc_fits(self.bc, cfg):
            raise ReplayInputError(
                f"{bc_name} takes observations {self.bc.obs_spec} and {self.bc.action_dim}-dim actions; {config_name} "
                f"has {self.obs_spec} and {action_dim} (replay with the config and BC policy the actor ran with)"
            )
        low, high = obs_lib.state_bounds(self.env.observation_space)
        self.agent = Q2RLAgent(cfg.agent, obs_spec=self.obs_spec, state_low=low, state_high=high,
                               action_dim=action_dim,
                               bc_policy=self.bc, qest_alpha=cfg.qest.alpha, seed=cfg.seed)  # fmt: skip
        self.agent.eval()
        self.agent.set_acting_precision(cfg.actor.gating_precision)  # score with what the actor gated with
        self._loaded: int | None = None

    def _use_version(self, version: int) -> None:
        if self._loaded != version:
            if self.weights is None:  # load_inputs leaves the weights out only for a log without gated steps
                raise ReplayInputError(f"weights version {version} is logged but no weights were given (--checkpoint)")
            tensors = self.weights.load(version)
            source = self.weights.describe_version(version)
            self._check_fits(tensors, source)
            try:
                self.agent.load_acting_state(tensors)
            except (KeyError, RuntimeError) as exc:  # what _check_fits did not foresee, still an input problem
                raise ReplayInputError(f"{source} do not fit {self._networks}: {exc}") from exc
            self._loaded = version

    def _check_fits(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """ReplayInputError naming the tensors when `tensors` are not the acting state of this config's networks
        (other sizes or critic count: a replay with another config than the actor's)."""
        expected = {
            f"{name}.{key}": tuple(value.shape)
            for name in Q2RLAgent.ACTING_MODULES
            for key, value in getattr(self.agent, name).state_dict().items()
        }
        problems = [f"{key}: missing from the weights" for key in sorted(expected.keys() - tensors.keys())]
        problems += [f"{key}: not in the config's networks" for key in sorted(tensors.keys() - expected.keys())]
        for key in sorted(expected.keys() & tensors.keys()):
            shape = tuple(tensors[key].shape)
            if shape != expected[key]:
                problems.append(f"{key}: weights {list(shape)}, config {list(expected[key])}")
        if problems:
            shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            raise ReplayInputError(
                f"{source} do not fit {self._networks}: {len(problems)} tensors differ: {shown} "
                "(replay with the config the actor ran with, its directory's config.yaml)"
            )

    def _feed_cameras(self, images: dict[str, np.ndarray], t: int) -> None:
        """Give each replay camera its logged image of step t (ReplayInputError when the log has none)."""
        for camera in self.cameras:
            if camera.name not in images:
                raise ReplayInputError(f"the log has no images of camera {camera.name}, which the config observes")
            camera.feed(images[camera.name][t])

    def replay_episode(self, ep: Episode, index: int, report: ReplayReport) -> None:
        """Replay one episode, appending its divergences to `report`."""
        n = len(ep)
        keys = sorted(ep.obs)
        if set(keys) != set(self.obs_spec):
            raise ReplayInputError(
                f"episode log {report.log}: demo {index} observes {keys}, the config's policies {sorted(self.obs_spec)}"
            )
        for key in keys:
            shape, dtype = self.obs_spec[key]
            logged = ep.obs[key]
            if tuple(logged.shape[1:]) != tuple(shape) or logged.dtype != np.dtype(dtype):
                raise ReplayInputError(
                    f"episode log {report.log}: demo {index} obs/{key} is {logged.dtype}{list(logged.shape[1:])}, the "
                    f"config's policies take {np.dtype(dtype)}{list(shape)}: replay with the config the actor ran "
                    "(its run directory's config.yaml)"
                )
        measured = self._measured(ep, report)
        rl_mode = "mode" if ep.attrs.get("kind") == "eval" else self.cfg.agent.rl_action
        codes = [int(c) for c in ep.extras["operator_event"]]
        operator = ReplayedOperator([(t, EVENTS_BY_CODE[c]) for t, c in enumerate(codes) if c in EVENTS_BY_CODE])
        ext = ep.extras

        target_noted = False  # a NaN logged target is said once per episode

        def check(t: int, name: str, logged: np.ndarray, replayed: np.ndarray) -> None:
            report.compared.add(name)
            if not self._same(name, logged, replayed):
                report.divergences.append(Divergence(index, t, name, np.asarray(logged), np.asarray(replayed)))

        self.robot.feed(measured[0])
        self._feed_cameras(ep.obs, 0)
        env_obs, _ = self.env.reset(options={"offset": np.clip(measured[0], self.env.mapper.low, self.env.mapper.high)})
        for t in range(n):
            obs = {k: ep.obs[k][t : t + 1] for k in keys}
            for key in self.env_keys:
                if key in obs:
                    check(t, f"obs/{key}" if key != STATE_OBS_KEY else "obs", obs[key][0], env_obs[key])
            version = int(ext["weights_version"][t])
            if version >= 0:
                action = self._gated_step(t, obs, ext, rl_mode, version, check)
                report.gated_steps += 1
            else:
                action = self._bc_step(t, obs, ext, check)
            check(t, "action", ep.actions[t], action)
            self.robot.feed(measured[t + 1] if t + 1 < n else measured[t])
            self._feed_cameras(ep.next_obs, t)  # what the actor saw after the step: next_obs[t] (= obs[t + 1])
            env_obs, reward, terminated, truncated, info = self.env.step(action)
            check(t, "target", ext["target"][t], info["target"])
            check(t, "command", ext["command"][t], info["command"])
            target = np.asarray(ext["target"][t], np.float64)
            if np.all(np.isfinite(target)):
                self.env.mapper.reset(target)  # continue from the logged target
            elif not target_noted:
                target_noted = True
                report.notes.append(
                    f"demo_{index} step {t}: the logged target holds NaN or inf (damaged, or an env that reported "
                    "none): the replay goes on from its own target there"
                )
            operator.advance(t)
            reward, terminated, truncated = apply_operator_events(
                [i.event for i in operator.poll()], reward, terminated, truncated
            )
            logged_done = np.array([ep.terminated[t], ep.truncated[t], ep.rewards[t]], np.float64)
            check(t, "done", logged_done, np.array([terminated, truncated, reward], np.float64))
        report.steps += n

    def _measured(self, ep: Episode, report: ReplayReport) -> np.ndarray:
        measured = ep.extras.get("measured")
        if measured is not None and np.all(np.isfinite(measured)):
            return np.asarray(measured, np.float64)
        if STATE_OBS_KEY in ep.obs and ep.obs[STATE_OBS_KEY].shape[1:] == (6,):
            if measured is None:
                why = "the log has no extras/measured (an older actor)"
            else:
                bad = np.flatnonzero(~np.isfinite(np.asarray(measured, np.float64).reshape(len(measured), -1)).all(1))
                why = f"extras/measured holds NaN or inf at {len(bad)} steps (first: step {int(bad[0])}; damaged?)"
            report.notes.append(
                f"{why}: the measured pose is taken from obs/ee_pose (float32, clipped to the observation bounds), so "
                "target and command may differ by its rounding"
            )
            return np.asarray(ep.obs[STATE_OBS_KEY], np.float64)
        raise ReplayInputError(f"episode log {report.log}: no extras/measured and no obs/ee_pose to feed the robot")

    @torch.no_grad()
    def _gated_step(
        self,
        t: int,
        obs: dict[str, np.ndarray],
        ext: dict[str, np.ndarray],
        rl_mode: str,
        version: int,
        check: Check,
    ) -> np.ndarray:
        self._use_version(version)
        agent = self.agent
        nets = agent.acting_networks()  # compact copies when the actor gated with them
        obs_t = agent.obs_tensors(obs)
        a_bc = agent.tensor(ext["bc_action"][t][None])
        gating = self.cfg.agent.gating
        features, bc_encoded = agent.acting_encodings(nets, obs_t)  # as the actor computed them
        bc_dist = None
        if gating != "none":
            bc_encoded = nets.bc_policy.encoder(obs_t) if bc_encoded is None else bc_encoded
            bc_dist = nets.bc_policy.head(bc_encoded)
            if self.cfg.agent.bc_action == "mode":
                check(t, "bc_action", ext["bc_action"][t], bc_dist.mode().clamp(-1.0, 1.0)[0].numpy())
        if rl_mode == "mode":
            a_rl = nets.actor(features).mode()
            check(t, "rl_action", ext["rl_action"][t], a_rl[0].numpy())
        else:
            a_rl = agent.tensor(ext["rl_action"][t][None])
        q_rl = agent.score_rl(nets, features, a_rl)
        q_bc = agent.score_bc(nets, gating, features, bc_encoded, bc_dist, a_bc)
        use_bc = agent.gate(q_bc, q_rl, a_bc, a_rl)
        check(t, "q_bc", ext["q_bc"][t], np.float32(q_bc[0]))
        check(t, "q_rl", ext["q_rl"][t], np.float32(q_rl[0]))
        check(t, "use_bc", ext["use_bc"][t], use_bc[0].numpy())
        chosen = torch.where(use_bc[:, None], a_bc, a_rl)
        return clip_action(chosen[0].numpy())

    @torch.no_grad()
    def _bc_step(self, t: int, obs: dict[str, np.ndarray], ext: dict[str, np.ndarray], check: Check) -> np.ndarray:
        if self.cfg.agent.bc_action == "mode":
            mode = self.bc.mode(obs_lib.to_tensors(obs, "cpu"))[0].numpy()
            check(t, "bc_action", ext["bc_action"][t], clip_action(mode))
        check(t, "use_bc", ext["use_bc"][t], np.bool_(True))
        return clip_action(ext["bc_action"][t])

    def _same(self, name: str, logged: np.ndarray, replayed: np.ndarray) -> bool:
        a, b = np.asarray(logged), np.asarray(replayed)
        if a.shape != b.shape:
            return False
        if name in EXACT_FIELDS:
            return bool(np.array_equal(a, b))
        x, y = a.astype(np.float64), b.astype(np.float64)
        with np.errstate(invalid="ignore"):
            close = (np.abs(x - y) <= self.atol) | (x == y) | (np.isnan(x) & np.isnan(y))
        return bool(close.all())


def replay_log(
    log: Path,
    *,
    checkpoint: Path | None = None,
    config: Path | None = None,
    bc_dir: Path | None = None,
    atol: float = DEFAULT_ATOL,
) -> ReplayReport:
    """Replay every episode of `log`; ReplayInputError (exit 2) when an input is unusable. See the module docstring."""
    start = time.perf_counter()
    if not np.isfinite(atol) or atol < 0:
        raise ReplayInputError(f"--atol must be a finite number >= 0, got {atol}")
    episodes = read_log(log)
    inputs = load_inputs(log, episodes, checkpoint=checkpoint, config=config, bc_dir=bc_dir)
    versions = gated_versions(episodes)
    if inputs.weights is not None:
        inputs.weights.check(versions)
    report = ReplayReport(log=log, episodes=len(episodes), versions=versions)
    weights = "no weights (BC only)" if inputs.weights is None else f"weights {inputs.weights.directory}"
    if checkpoint is not None and not versions:
        weights = f"no weights: every step acted with the BC policy alone, so --checkpoint {checkpoint} is not used"
    report.notes.append(f"replayed with config {inputs.config_path}, BC policy {inputs.bc_path}, {weights}")
    if inputs.weights is not None and inputs.weights.fixed is not None and versions:
        report.notes.append(f"every gated step replayed with {inputs.weights.describe()} (logged versions {versions})")
    report.notes.extend(env_notes(log, inputs))
    report.notes.extend(fault_notes(episodes))
    replayer = Replayer(inputs, atol=atol)
    for i, ep in enumerate(episodes):
        replayer.replay_episode(ep, i, report)
    report.wall_s = time.perf_counter() - start
    return report


def run_replay(
    log: Path,
    *,
    checkpoint: Path | None = None,
    config: Path | None = None,
    bc_dir: Path | None = None,
    atol: float = DEFAULT_ATOL,
    print_fn: Callable[[str], None] = print,
    error_fn: Callable[[str], None] | None = None,
) -> int:
    """`robot-rl replay`: print the report; 0 nothing diverged, 1 something did, 2 unusable input."""
    try:
        report = replay_log(log, checkpoint=checkpoint, config=config, bc_dir=bc_dir, atol=atol)
    except ReplayInputError as exc:
        (error_fn or print_fn)(f"robot-rl replay: {exc}")
        return 2
    for line in report.lines():
        print_fn(line)
    return report.exit_code
