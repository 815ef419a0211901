"""`robot-rl train`: Q-Estimation then online Q-gated RL, both roles in one process, writing a run directory.

The composition root of the single-process loop: it builds the env, the BC policy, the agent and the replay buffer
and passes each the slice of config it needs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from robot_rl import obs as obs_lib
from robot_rl.agent import Q2RLAgent
from robot_rl.bc import (
    ACTION_TOLERANCE,
    BC_FINGERPRINT_KEY,
    bc_fingerprint,
    load_bc,
    make_bc_policy,
    save_bc,
    train_bc,
)
from robot_rl.buffer import ReplayBuffer, learner_buffer
from robot_rl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from robot_rl.config import (
    BCConfig,
    ConfigError,
    EnvConfig,
    RunConfig,
    _format_validation_error,
    dump_config,
    load_config,
    parse_override,
)
from robot_rl.durable import refuse_nearly_full_disk, write_text_atomic
from robot_rl.envs import SIM_PEG_ENV_ID, make_env
from robot_rl.episodes import (
    COLLECT_FINISHED,
    COLLECT_REQUESTED,
    EpisodeFileError,
    EpisodeWriter,
    collect_shortfall,
    episodes_to_transitions,
    read_env_args,
    read_episodes,
)
from robot_rl.prefetch import learner_sampler
from robot_rl.qestimation import Rollout, run_q_estimation
from robot_rl.rollout import (
    StepChoice,
    bc_policy_fn,
    clip_action,
    evaluate,
    gated_policy_fn,
    run_episode,
)
from robot_rl.runlog import EvalRow, RunLog, StatusLine, plot_curves, write_json_atomic

log = logging.getLogger(__name__)

# Evaluation episodes use their own seeds, the same for every method and run seed, so curves compare like with like.
EVAL_SEED = 1_000_000
QEST_SEED_OFFSET = 500_000


def resolve_device(name: str) -> torch.device:
    """The torch device train.device names; ConfigError for 'cuda' where torch sees no CUDA device."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "train.device is 'cuda' but torch sees no CUDA device here (no GPU, no driver, or a CPU build of torch): "
            "use --set train.device=auto (CUDA when present, else the CPU) or train.device=cpu"
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# Image-config learner steps per second on a 2-core CPU, bf16 with torch.compile at best (docs/benchmarks.md), at
# sim_peg_image.yaml's sizes: batch 256, utd 4, 10 critics of [1024, 1024], two 84x84 cameras.
CPU_IMAGE_STEPS_PER_S = 0.7
CPU_IMAGE_MEASURED_AT = {"batch_size": 256, "utd": 4, "num_critics": 10, "hidden": [1024, 1024]}


def warn_image_learner_on_cpu(cfg: RunConfig, device: torch.device, warn: Callable[[str], None] | None = None) -> None:
    """Say at start, with the time it will take, when a config with cameras will learn on a CPU."""
    if device.type != "cpu" or not cfg.env.cameras:
        return
    steps = cfg.train.env_steps * cfg.train.learner_steps_per_env_step
    sizes = {key: getattr(cfg.agent, key) for key in CPU_IMAGE_MEASURED_AT}
    same = sizes == CPU_IMAGE_MEASURED_AT and all(c.out_size == 84 for c in cfg.env.cameras)
    if same:
        seconds = steps / CPU_IMAGE_STEPS_PER_S
        took = f"{seconds / 3600:.0f} h" if seconds >= 5400 else f"{max(seconds / 60, 1):.0f} min"
        how_long = f"will take about {took} or more (~{CPU_IMAGE_STEPS_PER_S} learner steps/s on a 2-core CPU)"
    else:  # the rate is measured at the image config's sizes only: smaller networks and batches run faster
        how_long = (
            f"are slow: ~{CPU_IMAGE_STEPS_PER_S} learner steps/s on a 2-core CPU at sim_peg_image.yaml's sizes "
            f"({', '.join(f'{k} {v}' for k, v in CPU_IMAGE_MEASURED_AT.items())}, 84x84 cameras), faster at this "
            "config's smaller ones"
        )
    why = "train.device is auto and torch sees no CUDA device here" if cfg.train.device == "auto" else "train.device"
    (warn or log.warning)(
        f"this config learns from cameras on the CPU ({why}): its {steps:.0f} online learner steps {how_long}; learn "
        "on a CUDA machine (train.device=cuda or auto) for image configs"
    )


def check_compile(mode: str, device: torch.device) -> None:
    """ConfigError when train.compile is on and no compiler torch.compile needs is on PATH (it builds its kernels
    with a C++ compiler on a CPU, a C compiler for Triton's launchers on a GPU): said at start, not after
    Q-Estimation at the first compiled update."""
    if mode == "off":
        return
    names = ("CXX", "c++", "g++", "clang++") if device.type == "cpu" else ("CC", "cc", "gcc", "clang")
    found = [name for name in names[1:] if shutil.which(name)]
    if os.environ.get(names[0]) and shutil.which(os.environ[names[0]]):
        found.append(os.environ[names[0]])
    if not found:
        kind = "C++" if device.type == "cpu" else "C"
        raise ConfigError(
            f"train.compile={mode} needs a {kind} compiler on PATH ({', '.join(names[1:])} or ${names[0]}) to build "
            f"its {device.type} kernels, and none was found: install one (apt-get install "
            f"{'g++' if kind == 'C++' else 'gcc'}) or set train.compile=off"
        )


# --------------------------------------------------------------------------------------------------------------------
# Demonstrations and BC
# --------------------------------------------------------------------------------------------------------------------
class ExpertFailed(ConfigError):
    """The scripted expert succeeded too rarely to record the demonstrations asked for (its or the task's settings)."""


def refuse_unreachable_sim_server(cfg: RunConfig) -> None:
    """ConfigError, before anything connects, when a franky-sim twin is asked for at an address its server cannot
    bind (it binds a loopback address; env.franka.host defaults to the real arm's)."""
    franka = cfg.env.franka
    if cfg.env.robot == "franky" and franka.sim_server and not franka.host.startswith("127."):
        raise ConfigError(
            f"env.franka.sim_server is true (a franky-sim twin) but env.franka.host is {franka.host!r}, and a "
            "franky-sim server binds a loopback address (127.x.y.z): set one, e.g. --set env.franka.host=127.0.1.2, "
            f"or, for the real arm at {franka.host}, env.franka.sim_server=false (actor: --robot franky)"
        )


def collect_demos(cfg: RunConfig, out_path: Path, *, episodes: int, seed: int, status: StatusLine | None = None):
    """Scripted-expert demonstrations (sim) written to robomimic-layout HDF5; returns (kept, attempted).
    ConfigError before connecting when the config names the real arm (the expert runs in simulation only);
    ExpertFailed when the expert succeeds too rarely."""
    from robot_rl.hardware.sim.expert import ScriptedExpert

    if cfg.env.robot != "sim" and not cfg.env.franka.sim_server:
        raise ConfigError(
            f"the scripted expert records demonstrations in simulation only, and env.robot {cfg.env.robot!r} with "
            f"env.franka.sim_server false is the real arm at {cfg.env.franka.host}: use env.robot=sim (the default) "
            "or a franky-sim twin (env.franka.sim_server=true)"
        )
    refuse_unreachable_sim_server(cfg)
    env = make_env(cfg.env)
    rng = np.random.default_rng(seed)
    expert = ScriptedExpert(env.unwrapped, cfg.expert, rng)
    kept = attempted = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with EpisodeWriter(out_path, env_args={"env": "robot_rl/PegInsertionSim-v0", "config": cfg.env.model_dump()}) as w:
        w.set_file_attrs(**{COLLECT_REQUESTED: episodes, COLLECT_FINISHED: False})  # a stop leaves it False
        while kept < episodes:
            if attempted >= 20 * episodes + 20:
                env.close()
                raise ExpertFailed(
                    f"the scripted expert succeeded in only {kept} of {attempted} episodes, too rarely to record "
                    f"{episodes} demonstrations; check the env.task settings (max_episode_steps is "
                    f"{cfg.env.task.max_episode_steps}: too few steps to insert the peg?) and the expert.* settings, "
                    "or set expert.successful_only=false to keep failed episodes too"
                )
            refuse_nearly_full_disk(out_path, cfg.actor.min_free_disk_mb, "actor.min_free_disk_mb")
            expert.reset()
            result = run_episode(env, _expert_policy(expert, env.observation_space), seed=seed + attempted)
            attempted += 1
            if result.success or not cfg.expert.successful_only:
                w.add_episode(result.episode)
                kept += 1
            if status is not None:
                status.update({"phase": "collect", "kept": kept, "attempted": attempted}, force=False)
        w.set_file_attrs(**{COLLECT_FINISHED: True})
    env.close()
    return kept, attempted


def _expert_policy(expert, space):
    def act(obs: dict[str, np.ndarray]) -> StepChoice:
        return StepChoice(action=clip_action(expert.act(obs)))

    return act


def transitions_obs(
    data: dict[str, np.ndarray],
    prefix: str,
    spec: obs_lib.ObsSpec,
    source: Path | str,
    warn: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """The `prefix/<key>` arrays of episodes_to_transitions' output as a dict observation matching `spec`; keys of
    `obs` that `spec` lacks are told to `warn` (default: a logged warning).

    EpisodeFileError (a ValueError) naming the file when a key is missing or its shape or dtype differs from the
    env's: demonstrations recorded with another config (another camera set-up, say).
    """
    found = sorted(k.split("/", 1)[1] for k in data if k.startswith(prefix + "/"))
    unused = sorted(set(found) - set(spec))
    if unused and prefix == "obs":
        (warn or log.warning)(f"{source}: observation keys {unused} are not observed by the config's env and go unused")
    missing = sorted(set(spec) - set(found))
    if missing:
        raise EpisodeFileError(
            f"{source}: the demonstrations lack the observation keys {missing} that the config needs (their "
            f"{prefix} has {found}, the config's env observes {sorted(spec)}); they were probably recorded with "
            f"another config: use that config, or record demonstrations with this one (`robot-rl collect`)"
        )
    out = {}
    for key, (shape, dtype) in spec.items():
        array = data[f"{prefix}/{key}"]
        if array.shape[1:] != tuple(shape):
            raise EpisodeFileError(
                f"{source}: the demonstrations' {prefix}/{key} has rows of shape {array.shape[1:]}, the config's env "
                f"observes {tuple(shape)}; they were probably recorded with another config"
            )
        if np.dtype(dtype) == np.uint8 and array.dtype != np.uint8:
            raise EpisodeFileError(
                f"{source}: the demonstrations' {prefix}/{key} is {array.dtype}, the config's env observes uint8 "
                "images; they were probably recorded with another config"
            )
        out[key] = array if array.dtype == np.dtype(dtype) else array.astype(dtype)
    return out


def demo_transitions(demos: Path, warn: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """The transitions of a demonstrations file (episodes_to_transitions); EpisodeFileError when it holds no
    demonstration with a step (an empty file, or one whose writer died before its first step) or its
    demonstrations differ in their fields. What the read skipped or derived goes to `warn`."""
    # Per-step extras (an actor's gating record, a fault's) are not demonstrations: BC and RLPD read the steps only,
    # so logs whose episodes record different extras (a run's rollouts.hdf5, say) still serve.
    episodes = [dataclasses.replace(ep, extras={}) for ep in read_episodes(demos, warn=warn)]
    if not episodes:
        raise EpisodeFileError(
            f"{demos}: no demonstration with a step in it; record some with `robot-rl collect` or pass another file"
        )
    short = collect_shortfall(demos, len(episodes))
    if short:
        (warn or log.warning)(f"{short}; training on those")
    failed = sum(not bool(ep.terminated[-1]) for ep in episodes)  # success terminates an episode
    if failed:
        (warn or log.warning)(
            f"{demos}: {failed} of {len(episodes)} episodes do not end in success, and their steps are used too "
            "(rollouts of a policy rather than demonstrations? record demonstrations with `robot-rl collect`)"
        )
    try:
        return episodes_to_transitions(episodes)
    except ValueError as err:  # demonstrations of two recordings appended into one file, say
        raise EpisodeFileError(f"{demos}: {err}") from err


# Env settings that give demonstrations their meaning: what an action moves the arm by, per step and how often, the
# frame of the pose observations, and what each camera image shows. Demonstrations recorded with other values teach
# a policy motions and views the config's env does not have.
_DEMO_MEANING = ("action.translation_scale_m", "action.rotation_scale_rad", "task.control_period_s",
                 "task.reference_height_m")  # fmt: skip
_CAMERA_MEANING = ("width", "height", "crop", "out_size")


def check_demos_env(demos: Path, env: EnvConfig) -> None:
    """EpisodeFileError naming the env settings in which `demos` were recorded otherwise than `env` says (read from
    the file's env_args, as `collect` and the actor write them); nothing to check in a file without them."""
    try:
        recorded = read_env_args(demos).get("config")
    except EpisodeFileError:
        return  # demonstrations recorded elsewhere need not say how
    if not isinstance(recorded, dict):
        return
    ours = env.model_dump(mode="json")

    def at(tree: Any, path: str) -> Any:
        for key in path.split("."):
            tree = tree.get(key) if isinstance(tree, dict) else None
        return tree

    differ = [(f"env.{path}", at(ours, path), at(recorded, path)) for path in _DEMO_MEANING]
    theirs = {c.get("name"): c for c in recorded.get("cameras") or [] if isinstance(c, dict)}
    for camera in ours["cameras"]:
        if (their := theirs.get(camera["name"])) is not None:
            differ += [(f"env.cameras {camera['name']} {key}", camera[key], their.get(key)) for key in _CAMERA_MEANING]
    differ = [(name, a, b) for name, a, b in differ if b is not None and a != b]
    if differ:
        shown = "; ".join(f"{name}: config {a}, demonstrations {b}" for name, a, b in differ)
        raise EpisodeFileError(
            f"{demos} was recorded with other env settings than the config's: {shown}. A policy learned from them "
            "would act and see otherwise than this env: give the config the demonstrations' values (--set), or record "
            "demonstrations with this config"
        )


def demo_actions(data: dict[str, np.ndarray], action_dim: int, source: Path | str) -> np.ndarray:
    """The `actions` of episodes_to_transitions' output as float32 in [-1, 1]; EpisodeFileError naming the file
    when they have another width than the env's actions or leave [-1, 1] (actions of another robot or controller,
    or not normalised)."""
    actions = data["actions"]
    if actions.shape[1] != action_dim:
        raise EpisodeFileError(
            f"{source}: the demonstrations' actions have {actions.shape[1]} dimensions, the config's env takes "
            f"{action_dim}; they were recorded for another robot or controller"
        )
    worst = float(np.abs(actions).max())
    if worst > 1.0 + ACTION_TOLERANCE:
        step = int(np.flatnonzero(np.abs(actions).max(axis=1) == worst)[0])
        raise EpisodeFileError(
            f"{source}: the demonstrations' actions must lie in [-1, 1] (the env's normalised actions), the largest "
            f"magnitude is {worst:g} (episode {int(data['episode_index'][step])}, step {int(data['step_index'][step])})"
        )
    return np.clip(actions, -1.0, 1.0).astype(np.float32)


def demo_buffer(
    demos: Path,
    spec: obs_lib.ObsSpec,
    action_dim: int,
    warn: Callable[[str], None] | None = None,
    *,
    data: dict[str, np.ndarray] | None = None,
    device: torch.device | None = None,
) -> ReplayBuffer:
    """A replay buffer holding every transition of a demonstrations file (RLPD's offline share); ValueError naming
    the file when its observations are not the env's. `data`: the file's demo_transitions, when already read;
    `device`: where the buffer keeps its copy (ReplayBuffer's device)."""
    if data is None:
        data = demo_transitions(demos, warn)
    buf = ReplayBuffer(max(len(data["actions"]), 1000), spec, action_dim, device=device)
    buf.add_many(
        obs=transitions_obs(data, "obs", spec, demos, warn),
        actions=demo_actions(data, action_dim, demos),
        rewards=data["rewards"],
        next_obs=transitions_obs(data, "next_obs", spec, demos),
        terminated=data["terminated"],
        truncated=data["truncated"],
    )
    return buf


# Beside a BC policy saved by train (train_bc_from_demos, checkpoints): the whole run config it was trained with.
BC_RUN_CONFIG = "config.yaml"


CHECKPOINT_BC_KEY = "bc_weights"  # in an agent checkpoint's manifest: the hash of its BC policy (bc_fingerprint)


def checkpoint_bc_entry(bc_weights: str | None) -> dict[str, str]:
    """The manifest entry naming the BC policy a checkpoint's agent was trained with, by its fingerprint
    (bc_fingerprint's BC_FINGERPRINT_KEY, hashed once per run); {} without one."""
    return {} if bc_weights is None else {CHECKPOINT_BC_KEY: bc_weights}


def check_checkpoint_bc(checkpoint: Path, manifest: dict, bc: torch.nn.Module | None) -> None:
    """CheckpointError when the BC policy in `checkpoint`/bc is not the one its manifest names (replaced by another
    BC directory): its gating would pair the agent with a Q^_BC it was never trained against."""
    recorded = manifest.get(CHECKPOINT_BC_KEY)  # checkpoints saved before it was recorded lack it
    if bc is None or recorded is None:
        return
    if bc_fingerprint(bc)[BC_FINGERPRINT_KEY] != recorded:
        raise CheckpointError(
            f"{checkpoint}: its bc/ holds another BC policy than the one the agent was trained with (the "
            f"manifest's {CHECKPOINT_BC_KEY} differs): put back the run's own bc/, or use another checkpoint"
        )


def save_bc_with_config(policy: torch.nn.Module, directory: Path, cfg: RunConfig) -> None:
    """save_bc, then the run config beside it: `robot-rl eval` of the directory alone evaluates in that config's env."""
    save_bc(policy, directory)
    write_text_atomic(directory / BC_RUN_CONFIG, dump_config(cfg))


def train_bc_from_demos(
    cfg: RunConfig,
    demos_path: Path,
    out_dir: Path,
    *,
    seed: int,
    warn: Callable[[str], None] | None = None,
    data: dict[str, np.ndarray] | None = None,
) -> torch.nn.Module:
    """A BC policy trained on a demonstrations file and saved to `out_dir`. `data`: the file's demo_transitions,
    when already read."""
    check_demos_env(demos_path, cfg.env)
    if data is None:
        data = demo_transitions(demos_path, warn)
    env = make_env(cfg.env)
    spec = obs_lib.spec_from_space(env.observation_space)
    low, high = obs_lib.state_bounds(env.observation_space)
    env.close()
    obs = transitions_obs(data, "obs", spec, demos_path, warn)
    actions = demo_actions(data, int(env.action_space.shape[0]), demos_path)
    with torch.random.fork_rng(devices=[]):  # the initial weights follow the seed too (torch's global RNG untouched)
        torch.manual_seed(seed)
        policy = make_bc_policy(cfg.bc, spec, actions.shape[1], low, high)
    train_bc(policy, obs, actions, cfg.bc, seed=seed)
    save_bc_with_config(policy, Path(out_dir), cfg)
    return policy


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class Counters:
    env_steps: int = 0
    qest_env_steps: int = 0
    learner_steps: int = 0
    episodes: int = 0
    successes: int = 0
    bc_steps_recent: int = 0
    steps_recent: int = 0


class Trainer:
    """Owns everything of one `robot-rl train` run."""

    def __init__(self, cfg: RunConfig, out: Path, *, bc_dir: Path | None, demos: Path | None, quiet: bool) -> None:
        self.cfg, self.out = cfg, out
        trains_bc = bc_dir is None and cfg.agent.method != "sac"
        if demos is not None and not trains_bc and cfg.agent.effective_offline_ratio <= 0:
            why = f"the BC policy comes from --bc {bc_dir}" if bc_dir is not None else "method sac has no BC policy"
            raise ConfigError(
                f"--demos {demos} would be ignored: {why}, and method {cfg.agent.method} samples no demonstrations "
                "(offline ratio 0). Drop --demos, or set agent.offline_ratio above 0 to sample them"
            )
        self.device = resolve_device(cfg.train.device)  # before anything is written: a refusal leaves no run
        check_compile(cfg.train.compile, self.device)
        warn_image_learner_on_cpu(cfg, self.device)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_config(cfg))
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.status = StatusLine(enabled=not quiet)
        self.log = RunLog(out)
        self.start = time.monotonic()
        self.counters = Counters()
        self.learner_time = 0.0
        self.env = make_env(cfg.env)
        self.eval_env = make_env(cfg.env)
        self.obs_spec = obs_lib.spec_from_space(self.env.observation_space)
        self.state_low, self.state_high = obs_lib.state_bounds(self.env.observation_space)
        self.action_dim = int(self.env.action_space.shape[0])
        self.demos_path = demos
        self._demos_read: dict[str, np.ndarray] | None = None
        self._told: set[str] = set()
        self.bc = self._bc_policy(bc_dir)
        self.bc_weights = None if self.bc is None else bc_fingerprint(self.bc)[BC_FINGERPRINT_KEY]  # for checkpoints
        self.agent = Q2RLAgent(
            cfg.agent,
            obs_spec=self.obs_spec,
            state_low=self.state_low,
            state_high=self.state_high,
            action_dim=self.action_dim,
            bc_policy=self.bc,
            qest_alpha=cfg.qest.alpha,
            seed=cfg.seed,
            device=self.device,
            amp=cfg.train.bf16,
            compile=cfg.train.compile,
            cuda_graph=cfg.train.cuda_graph and self.device.type == "cuda",
        )
        self.buffer = learner_buffer(cfg.train, self.obs_spec, self.action_dim, self.device)
        self.offline = self._offline_buffer()
        self.sampler = learner_sampler(self.buffer, self.offline, cfg, self.rng, self.device)
        # Everything the loop executes is on disk: BC rollouts and online episodes with the gating record.
        self.rollouts = EpisodeWriter(
            out / "rollouts.hdf5", env_args={"env": SIM_PEG_ENV_ID, "config": cfg.env.model_dump(mode="json")}
        )

    # -- set-up -------------------------------------------------------------------------------------------------------
    def _ensure_demos(self) -> Path:
        if self.demos_path is None:
            self.demos_path = self.out / "demos.hdf5"
            self._status("collect", force=True)
            collect_demos(self.cfg, self.demos_path, episodes=self.cfg.bc.demos, seed=self.cfg.seed * 7919 + 1)
        return self.demos_path

    def _bc_policy(self, bc_dir: Path | None) -> torch.nn.Module | None:
        if self.cfg.agent.method == "sac" and bc_dir is None:
            return None
        if bc_dir is not None:
            bc = load_bc(bc_dir, device=self.device)
            if bc.obs_spec != self.obs_spec:
                raise ConfigError(
                    f"--bc {bc_dir}: the BC policy observes {bc.obs_spec}, the config's env {self.obs_spec}; it was "
                    "probably trained with another config"
                )
            self._take_bc_config(bc.cfg, bc_dir)
            return bc
        demos = self._ensure_demos()
        self._status("bc_train", force=True)
        policy = train_bc_from_demos(
            self.cfg, demos, self.out / "bc", seed=self.cfg.seed, warn=self._warn_once, data=self._demo_data()
        )
        return policy.to(self.device)

    def _take_bc_config(self, used: BCConfig, bc_dir: Path) -> None:
        """The run's config records the BC settings of the policy it uses (--bc), not those of the config file or
        --set, which train nothing here; a difference is said."""
        ours, theirs = self.cfg.bc.model_dump(mode="json"), used.model_dump(mode="json")
        differ = [f"bc.{k} {ours[k]!r} (config) / {theirs[k]!r} (policy)" for k in ours if ours[k] != theirs.get(k)]
        if not differ:
            return
        self._warn_once(
            f"--bc {bc_dir}: its policy was trained with other BC settings than the config's, which train nothing "
            f"here: {'; '.join(differ)}; the run uses and records the policy's"
        )
        self.cfg = self.cfg.model_copy(update={"bc": used})
        write_text_atomic(self.out / "config.yaml", dump_config(self.cfg))

    def _demo_data(self) -> dict[str, np.ndarray]:
        """The demonstrations' transitions, read once for BC training and the offline buffer together."""
        if self._demos_read is None:
            self._demos_read = demo_transitions(self._ensure_demos(), self._warn_once)
        return self._demos_read

    def _offline_buffer(self) -> ReplayBuffer | None:
        try:
            if self.cfg.agent.effective_offline_ratio <= 0:
                return None
            demos = self._ensure_demos()
            check_demos_env(demos, self.cfg.env)
            return demo_buffer(
                demos,
                self.obs_spec,
                self.action_dim,
                warn=self._warn_once,
                data=self._demo_data(),
                device=self.buffer.device,
            )
        finally:
            self._demos_read = None  # both readers are done: the buffer holds its own copy

    def _warn_once(self, line: str) -> None:
        """A note on the demonstrations, printed once although BC and the offline buffer both read them."""
        if line not in self._told:
            self._told.add(line)
            print(f"robot-rl train: {line}", file=sys.stderr, flush=True)

    # -- helpers ------------------------------------------------------------------------------------------------------
    def _status(self, phase: str, *, force: bool = False, **extra) -> None:
        c = self.counters
        last = self.log.rows[-1] if self.log.rows else None
        fields = {
            "phase": phase,
            "env": f"{c.env_steps}",
            "episodes": c.episodes,
            "success(eval)": "-" if last is None else f"{last.success_rate:.2f}",
            "bc-frac": f"{c.bc_steps_recent / c.steps_recent:.2f}" if c.steps_recent else "-",
            "learner": f"{c.learner_steps} ({c.learner_steps / max(self.learner_time, 1e-9):.1f}/s)",
            "wall": f"{time.monotonic() - self.start:.0f}s",
        }
        fields.update(extra)
        self.status.update(fields, force=force)

    def _evaluate(self, phase: str) -> EvalRow:
        if self.cfg.agent.method == "sac" or phase == "bc":
            policy = (
                bc_policy_fn(self.bc, mode=self.cfg.agent.bc_action, seed=BC_EVAL_SEED)
                if phase == "bc"
                else gated_policy_fn(self.agent, rl_action="mode")
            )
        else:
            policy = gated_policy_fn(self.agent, rl_action="mode")
        result = evaluate(self.eval_env, policy, episodes=self.cfg.train.eval_episodes, seed=EVAL_SEED)
        row = EvalRow(
            env_steps=self.counters.env_steps,
            learner_steps=self.counters.learner_steps,
            wall_s=round(time.monotonic() - self.start, 2),
            success_rate=result.success_rate,
            bc_action_fraction=result.bc_action_fraction,
            episodes=result.episodes,
            phase=phase,
        )
        self.log.eval_row(row)
        self._status(phase, force=True)
        return row

    def _store_episode_steps(self, obs, action, reward, next_obs, terminated, truncated, bc_action) -> None:
        with self.sampler.lock:
            self.buffer.add(
                obs=obs,
                action=action,
                reward=reward,
                next_obs=next_obs,
                terminated=terminated,
                truncated=truncated,
                bc_action=bc_action,
            )

    def _check_disk(self) -> None:
        """Before each episode: stop (OSError ENOSPC, said as a full disk) while --out still has
        actor.min_free_disk_mb free, rather than let an HDF5 write fail midway."""
        refuse_nearly_full_disk(self.out, self.cfg.actor.min_free_disk_mb, "actor.min_free_disk_mb")

    def _learner_step(self) -> None:
        t0 = time.perf_counter()
        stats = self.agent.update(self.sampler.next())
        self.learner_time += time.perf_counter() - t0
        self.counters.learner_steps += 1
        if self.counters.learner_steps % 100 == 0:
            self.log.scalars("train", stats.as_dict(), self.counters.env_steps)

    # -- phases -------------------------------------------------------------------------------------------------------
    def q_estimation(self) -> dict:
        cfg = self.cfg
        rollouts = []
        policy = bc_policy_fn(self.bc, mode=cfg.agent.bc_action, seed=cfg.seed + 17)
        for i in range(cfg.qest.rollouts):
            self._check_disk()
            result = run_episode(self.env, policy, seed=cfg.seed * 7919 + QEST_SEED_OFFSET + i)
            ep = result.episode
            obs, next_obs = ep.obs, ep.next_obs
            rollouts.append(
                Rollout(
                    obs=obs,
                    actions=ep.actions,
                    rewards=ep.rewards,
                    terminated=bool(ep.terminated[-1]),
                    final_next_obs=obs_lib.take(next_obs, len(ep) - 1),
                )
            )
            with self.sampler.lock:
                self.buffer.add_many(
                    obs=obs,
                    actions=ep.actions,
                    rewards=ep.rewards,
                    next_obs=next_obs,
                    terminated=ep.terminated,
                    truncated=ep.truncated,
                    bc_actions=ep.actions,
                )
            ep.attrs.update(phase="qest_rollouts", weights_version=0)
            self.rollouts.add_episode(ep)
            self.counters.env_steps += result.length
            self.counters.qest_env_steps += result.length
            self.counters.episodes += 1
            self.counters.successes += int(result.success)
            self._status("qest_rollouts", force=(i % 10 == 0), rollout=f"{i + 1}/{cfg.qest.rollouts}")
        self._status("qest_fit", force=True)
        stats = run_q_estimation(
            self.agent,
            rollouts,
            cfg.qest,
            q_init=cfg.agent.q_init,
            actor_pretrain=True,
            seed=cfg.seed,
            progress=lambda phase, step, total: self._status(phase, step=f"{step}/{total}"),
        )
        return asdict(stats) | {"rollout_success_rate": self.counters.successes / max(self.counters.episodes, 1)}

    def online(self) -> None:
        cfg = self.cfg
        target_steps = self.counters.env_steps + cfg.train.env_steps
        next_eval = self.counters.env_steps + cfg.train.eval_every
        next_ckpt = self.counters.env_steps + cfg.train.checkpoint_every
        # Methods that start from Q-initialised critics may learn at once; the others wait for some data.
        starts = 0 if cfg.agent.q_init else cfg.train.learning_starts
        rl_action = cfg.agent.rl_action if cfg.agent.gating != "none" else "sample"
        policy = gated_policy_fn(self.agent, rl_action=rl_action)
        credit = 0.0
        episode_index = 0
        while self.counters.env_steps < target_steps:
            self._check_disk()
            obs, _ = self.env.reset(seed=cfg.seed * 7919 + episode_index)
            episode_index += 1
            done = False
            stream = self.rollouts.begin_episode({"phase": "online", "seed": cfg.seed * 7919 + episode_index - 1})
            while not done and self.counters.env_steps < target_steps:
                choice = policy(obs)
                next_obs, reward, terminated, truncated, info = self.env.step(choice.action)
                stream.append(
                    obs=obs,
                    action=choice.action,
                    reward=float(reward),
                    terminated=bool(terminated),
                    truncated=bool(truncated),
                    next_obs=next_obs,
                    extras=_gating_extras(choice, self.counters.learner_steps, self.action_dim),
                )
                bc_action = choice.extras.get("bc_action")
                self._store_episode_steps(obs, choice.action, reward, next_obs, terminated, truncated, bc_action)
                c = self.counters
                c.env_steps += 1
                c.steps_recent += 1
                c.bc_steps_recent += int(bool(choice.extras.get("use_bc", False)))
                obs, done = next_obs, bool(terminated or truncated)
                if done:
                    c.episodes += 1
                    c.successes += int(bool(info.get("is_success", False)))
                if len(self.buffer) >= max(starts, 1):
                    credit += cfg.train.learner_steps_per_env_step
                    while credit >= 1.0:
                        self._learner_step()
                        credit -= 1.0
                if c.env_steps >= next_eval:
                    self._evaluate("online")
                    self.log.scalars(
                        "train",
                        {"bc_action_fraction": c.bc_steps_recent / max(c.steps_recent, 1)},
                        c.env_steps,
                    )
                    c.bc_steps_recent = c.steps_recent = 0
                    next_eval += cfg.train.eval_every
                if c.env_steps >= next_ckpt:
                    self.checkpoint(f"step_{c.env_steps:08d}")
                    next_ckpt += cfg.train.checkpoint_every
                self._status("online")
            stream.end(interrupted=not done)

    def checkpoint(self, name: str) -> Path:
        path = self.out / "checkpoints" / name
        manifest = {
            "kind": "q2rl_agent",
            "method": self.cfg.agent.method,
            "seed": self.cfg.seed,
            "counters": asdict(self.counters),
            "obs_spec": obs_lib.spec_to_json(self.obs_spec),
            "action_dim": self.action_dim,
            "config": self.cfg.model_dump(mode="json"),
            "has_bc": self.bc is not None,
            **checkpoint_bc_entry(self.bc_weights),
        }
        save_checkpoint(
            path,
            tensors=self.agent.network_state(),
            manifest=manifest,
            optimizers=self.agent.optimizer_states(),
        )
        if self.bc is not None:
            save_bc_with_config(self.bc, path / "bc", self.cfg)
        return path

    def run(self) -> dict:
        cfg = self.cfg
        try:
            bc_row = self._evaluate("bc") if self.bc is not None else None
            qest = {}
            if cfg.agent.uses_q_estimation:
                qest = self.q_estimation()
            self._evaluate("start")
            self.online()
            if not self.log.rows or self.log.rows[-1].env_steps != self.counters.env_steps:
                self._evaluate("online")
            self.checkpoint("final")
            online_rows = [r for r in self.log.rows if r.phase in ("start", "online")]
            summary = {
                "method": cfg.agent.method,
                "seed": cfg.seed,
                "bc_success_rate": None if bc_row is None else bc_row.success_rate,
                "final_success_rate": online_rows[-1].success_rate,
                "best_success_rate": max(r.success_rate for r in online_rows),
                "env_steps": self.counters.env_steps,
                "qest_env_steps": self.counters.qest_env_steps,
                "learner_steps": self.counters.learner_steps,
                "learner_steps_per_s": self.counters.learner_steps / max(self.learner_time, 1e-9),
                "wall_s": round(time.monotonic() - self.start, 2),
                "episodes": self.counters.episodes,
                "q_estimation": qest,
                "device": str(self.device),
            }
            write_json_atomic(self.out / "summary.json", summary)
            plot_curves(
                {cfg.agent.method: self.log.rows},
                self.out / "curves.png",
                bc_success=summary["bc_success_rate"],
                title=f"{cfg.agent.method}, seed {cfg.seed}",
            )
            return summary
        finally:
            self.sampler.close()
            self.status.close()
            self.rollouts.close()
            self.log.close()
            self.env.close()
            self.eval_env.close()


def _gating_extras(choice: StepChoice, weights_version: int, action_dim: int) -> dict[str, np.ndarray]:
    """The per-step gating record with fixed keys and dtypes (NaN where a method has no BC proposal or value)."""
    nan_action = np.full(action_dim, np.nan, np.float32)
    e = choice.extras
    return {
        "bc_action": np.asarray(e.get("bc_action", nan_action), np.float32),
        "rl_action": np.asarray(e.get("rl_action", nan_action), np.float32),
        "q_bc": np.float32(e.get("q_bc", np.nan)),
        "q_rl": np.float32(e.get("q_rl", np.nan)),
        "use_bc": np.bool_(e.get("use_bc", False)),
        "weights_version": np.int64(weights_version),
    }


def run_training(
    cfg: RunConfig, out: Path, *, bc_dir: Path | None = None, demos: Path | None = None, quiet: bool = False
) -> dict:
    return Trainer(cfg, out, bc_dir=bc_dir, demos=demos, quiet=quiet).run()


# --------------------------------------------------------------------------------------------------------------------
# Scoring a checkpoint
# --------------------------------------------------------------------------------------------------------------------
def load_agent(checkpoint: Path, *, device: str = "cpu") -> tuple[Q2RLAgent, RunConfig, dict]:
    """The agent of a `train` checkpoint with its run config and manifest; CheckpointError naming the manifest when
    it lacks a field or its config is not valid (a manifest edited by hand, or written by another version)."""
    from robot_rl.checkpoint import MANIFEST_FILE

    tensors, manifest, optimizers = load_checkpoint(checkpoint)
    where = checkpoint / MANIFEST_FILE
    if manifest.get("kind") != "q2rl_agent":
        raise CheckpointError(f"{checkpoint} is not an agent checkpoint (kind {manifest.get('kind')!r})")
    if not isinstance(manifest.get("config"), dict):
        raise CheckpointError(f"{where} has no run config (its 'config' entry is missing); use another checkpoint")
    try:
        cfg = RunConfig.model_validate(manifest["config"])
    except ValidationError as err:
        problems = "; ".join(line.strip() for line in _format_validation_error(err, str(where)).splitlines()[1:])
        raise CheckpointError(
            f"{where}: its run config is not valid ({problems}); the manifest was edited, or written by another "
            "version: use another checkpoint"
        ) from None
    action_dim = manifest.get("action_dim")
    if not isinstance(action_dim, int) or isinstance(action_dim, bool) or action_dim < 1:
        raise CheckpointError(f"{where}: action_dim must be a positive integer, got {action_dim!r}")
    bc = load_bc(checkpoint / "bc", device=device) if manifest.get("has_bc") else None
    check_checkpoint_bc(checkpoint, manifest, bc)
    if "obs_spec" not in manifest:
        raise CheckpointError(f"{checkpoint}: the manifest has no obs_spec (written by an older robot_rl; retrain)")
    try:
        spec = obs_lib.check_spec(manifest["obs_spec"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: obs_spec is not valid: {exc}") from None
    dim = obs_lib.state_dim(spec)
    # Placeholder bounds: the saved normaliser buffers overwrite them.
    agent = Q2RLAgent(
        cfg.agent,
        obs_spec=spec,
        state_low=-np.ones(dim, np.float32),
        state_high=np.ones(dim, np.float32),
        action_dim=action_dim,
        bc_policy=bc,
        qest_alpha=cfg.qest.alpha,
        seed=cfg.seed,
        device=device,
    )
    try:
        agent.load_network_state(tensors)
        agent.load_optimizer_states(optimizers)
    except (KeyError, ValueError, RuntimeError) as exc:  # load_state_dict: missing, unexpected or misshapen tensors
        detail = " ".join(str(exc).split())  # torch's message spans lines
        raise CheckpointError(f"checkpoint {checkpoint} does not fit its own config's networks: {detail}") from exc
    return agent, cfg, manifest


def refuse_other_obs(env, spec: obs_lib.ObsSpec, what: str, source: str, trained_with: str) -> None:
    """ConfigError (closing `env`) when `env` observes other than `spec`, what the policy `what` was trained on:
    the env of `source` is not the one it was trained in."""
    observed = obs_lib.spec_from_space(env.observation_space)
    if observed != spec:
        env.close()
        differ = [k for k in sorted(set(spec) | set(observed)) if spec.get(k) != observed.get(k)]
        detail = "; ".join(
            f"{k}: {_shape_of(spec.get(k))} against the env's {_shape_of(observed.get(k))}" for k in differ
        )
        raise ConfigError(
            f"{what} observes other than the env of {source} ({detail}); pass --config with the config {trained_with}"
        )


def _shape_of(entry: tuple | None) -> str:
    """An observation spec entry (shape, dtype) as 'shape dtype', or 'nothing' for a key one side lacks."""
    return "nothing" if entry is None else f"{tuple(entry[0])} {entry[1]}"


# What `eval --set` may change: the env the fixed policy acts in, and whether its BC proposal is the mode or a sample.
EVAL_OVERRIDABLE = ("env", "agent.bc_action")
# The seed of the BC policy's samples when it is evaluated (by train, and by `robot-rl eval`: the same episodes).
BC_EVAL_SEED = 7


def differences_from_training(own: RunConfig, used: RunConfig, what: str, source: str) -> list[str]:
    """The env fields in which `used` (--config's) differs from `own`, the config `what` was trained with, for the
    report; ConfigError when it differs in the networks or method, which an evaluation cannot change (--config would
    be taken for them and is not)."""
    from robot_rl.wire import config_fingerprint, describe_differences

    fields = describe_differences(config_fingerprint(own), config_fingerprint(used), "the training's", "--config's")
    fixed = [f for f in fields if not f.startswith(("env.", "obs.")) and f not in ("agent.bc_action", "action_dim")]
    if fixed:
        raise ConfigError(
            f"{source} differs from the config {what} was trained with in {', '.join(fixed)}: its networks and method "
            "are fixed, and --config changes only the env it acts in (or leave --config out)"
        )
    return [f for f in fields if f.startswith("env.")]


def refuse_eval_overrides(overrides: list[str], what: str) -> None:
    """ConfigError for an --set of anything but EVAL_OVERRIDABLE: the networks, the method and the training
    settings of `what`, a checkpoint, are fixed, and the episodes' seeds come from --seed."""
    for text in overrides:
        keys, _ = parse_override(text)
        path = ".".join(keys)
        if not any(path == field or path.startswith(field + ".") for field in EVAL_OVERRIDABLE):
            raise ConfigError(
                f"--set {path}: cannot change the evaluation of {what}, whose networks and method are fixed; eval "
                "takes overrides of env.* and agent.bc_action only (the episodes' seeds: --seed)"
            )


def eval_config(
    own: RunConfig | None, config_path: Path | None, overrides: list[str] | None, what: str
) -> tuple[RunConfig, str]:
    """The config an evaluation of the checkpoint `what` runs under, and words for where it came from: --config's
    (else `own`, the config the checkpoint was trained with, else the embedded defaults) with the --set overrides
    on top. Its callers have refused the overrides refuse_eval_overrides refuses before reading the checkpoint."""
    overrides = list(overrides or [])
    shown = "".join(f" --set {text}" for text in overrides)
    if config_path is not None or own is None:
        source = f"--config {config_path}" if config_path is not None else "the embedded default config (no --config)"
        cfg = load_config(config_path, overrides)
    else:
        source = f"the config {what} was trained with"
        cfg = load_config(None, overrides, base=own, source=source + shown)
    refuse_unreachable_sim_server(cfg)
    return cfg, source + shown


def evaluate_checkpoint(
    checkpoint: Path, *, episodes: int, seed: int = EVAL_SEED, config_path: Path | None = None, overrides=None
) -> dict:
    """The success rate of a `train` checkpoint in its own config's env (else --config's), --set overrides of
    EVAL_OVERRIDABLE applied (eval_config)."""
    what = f"checkpoint {checkpoint}"
    refuse_eval_overrides(list(overrides or []), what)  # before the checkpoint is read
    agent, cfg, _ = load_agent(checkpoint)
    run_cfg, source = eval_config(cfg, config_path, overrides, what)
    if run_cfg.agent.bc_action != agent.cfg.bc_action:
        agent.cfg = agent.cfg.model_copy(update={"bc_action": run_cfg.agent.bc_action})
    env = make_env(run_cfg.env)
    refuse_other_obs(env, agent.obs_spec, what, source, "the checkpoint was trained with (or none: its own)")
    try:
        env_differs = differences_from_training(cfg, run_cfg, what, source)
        result = evaluate(env, gated_policy_fn(agent, rl_action="mode"), episodes=episodes, seed=seed)
    finally:
        env.close()
    return {"checkpoint": str(checkpoint), "method": cfg.agent.method, "config": source,
            "env_differs_from_training": env_differs, **asdict(result)}  # fmt: skip
