"""The Q2RL agent: SAC with a REDQ-style critic ensemble, an auxiliary BC loss, and Q-gating (design §5).

No I/O here: the agent takes minibatches and observations, returns statistics and decisions. Baselines (IBRL, RLPD,
SAC) and ablations (no gating, no Q-initialisation) are the same code with `AgentConfig.method` switching parts.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robot_rl import obs as obs_lib
from robot_rl.buffer import TransitionBatch
from robot_rl.compact import compact_copy, joint_encoder
from robot_rl.config import CUDA_GRAPH_COMPILE_MODES, AgentConfig
from robot_rl.cuda_graph import StepGraph
from robot_rl.networks import Actor, CriticEnsemble, ObsEncoder, ValueNet, augment, shift_obs
from robot_rl.obs import ObsSpec
from robot_rl.prefetch import to_tensors

TensorObs = dict[str, torch.Tensor]


# What a learner step reports, in the order `Q2RLAgent._step_tensors` returns it.
STEP_STATISTICS = ("critic_loss", "q_mean", "temperature", "actor_loss", "sac_loss", "bc_loss", "entropy")


class TrainingDiverged(RuntimeError):
    """A learner step produced non-finite losses or values."""


@dataclass(frozen=True)
class UpdateStats:
    """What one learner step (UTD critic updates + one actor update) reports."""

    critic_loss: float
    actor_loss: float
    sac_loss: float
    bc_loss: float
    temperature: float
    entropy: float
    q_mean: float
    critic_updates: int
    actor_updates: int

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ActingNetworks:
    """The networks Q-gating reads: the agent's own (float32), or compact copies of them (robot_rl.compact)."""

    encoder: nn.Module
    actor: nn.Module
    critics: nn.Module
    value: nn.Module
    bc_policy: nn.Module | None
    # Both image encodings at once (robot_rl.compact.JointEncoder): obs -> (encoder(obs), bc_policy.encoder(obs)).
    joint: nn.Module | None = None


@dataclass(frozen=True)
class PreparedActing:
    """New acting weights made ready off the control thread (Q2RLAgent.prepare_acting / use_acting)."""

    modules: dict[str, nn.Module]  # ACTING_MODULES name -> a float32 module holding the new weights
    compact: ActingNetworks | None  # their compact copies, when prepared for the 'int8' acting precision
    precision: str


@dataclass(frozen=True)
class GateDecision:
    """Both proposals, both values and the decision, batched ([B, A] and [B]); numpy."""

    bc_action: np.ndarray
    rl_action: np.ndarray
    q_bc: np.ndarray
    q_rl: np.ndarray
    use_bc: np.ndarray
    action: np.ndarray


def transform_reward(reward: torch.Tensor | np.ndarray, scale: float, bias: float) -> torch.Tensor | np.ndarray:
    """r~ = scale * r + bias (the WSRL/Q2RL reward transform)."""
    return scale * reward + bias


class Q2RLAgent(nn.Module):
    """Networks, optimisers and update rules. `bc_policy` is frozen and only scored, never trained here.

    Observations are dicts (robot_rl.obs). `encoder` (the critics' observation encoder: state normaliser plus one CNN
    per camera) is trained by the critic loss and feeds the actor detached; `target_encoder` follows it with the
    target critics. V_BC reads the frozen BC policy's encoding of the observation (its normalised state and camera
    features), so gating encodes each image twice, not three times. Images are randomly shifted (DrQ) whenever the
    networks learn.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        obs_spec: ObsSpec,
        state_low: np.ndarray,
        state_high: np.ndarray,
        action_dim: int,
        bc_policy: nn.Module | None,
        qest_alpha: float = 1.0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        amp: bool = False,
        compile: str = "off",
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.device = torch.device(device)
        self.amp = amp
        self.obs_spec = obs_lib.check_spec(obs_spec)
        self.action_dim = action_dim
        self.qest_alpha = qest_alpha
        torch.manual_seed(seed)
        self.encoder = ObsEncoder(self.obs_spec, state_low, state_high, cfg.encoder)
        self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.image_keys = self.encoder.image_keys
        feature_dim = self.encoder.out_dim
        self.actor = Actor(feature_dim, action_dim, cfg.hidden)
        self.critics = CriticEnsemble(feature_dim, action_dim, cfg.hidden, cfg.num_critics, layer_norm=cfg.layer_norm)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        # Without a BC policy there is no V_BC to learn; the (unused) net then reads the critics' features.
        value_in = bc_policy.encoder.out_dim if bc_policy is not None else feature_dim
        self.value = ValueNet(value_in, cfg.hidden, layer_norm=cfg.layer_norm)
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(cfg.init_temperature))))
        self.target_entropy = -float(action_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.bc_policy = bc_policy
        if bc_policy is not None:
            bc_policy.requires_grad_(False)
        self.to(self.device)
        # Where the step runs in a CUDA graph (ours, or torch.compile's), the optimisers keep their step counts on the
        # GPU (capturable): a CPU tensor in the step keeps torch.compile from capturing it, and our capture refuses a
        # non-capturable optimiser. Elsewhere capturable only costs time (torch says so).
        self._capturable = self.device.type == "cuda" and (cuda_graph or compile in CUDA_GRAPH_COMPILE_MODES)
        adam = functools.partial(torch.optim.Adam, capturable=self._capturable)
        self._actor_params = list(self.actor.parameters())
        self.actor_opt = adam(self._actor_params, lr=cfg.actor_lr)
        self.critic_opt = adam(self.critic_parameters(), lr=cfg.critic_lr)
        self.alpha_opt = adam([self.log_alpha], lr=cfg.temperature_lr)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # The soft update as two fused ops (one per list) instead of one small op per tensor.
        self._online = [*self.critics.parameters(), *self.encoder.parameters()]
        self._targets = [*self.target_critics.parameters(), *self.target_encoder.parameters()]
        # The tensor work of each update, compiled with torch.compile when asked (train.compile: its mode).
        if compile not in ("off", "default", "reduce-overhead", "max-autotune"):
            raise ValueError(f"unknown compile mode {compile!r}")
        self.compile_mode = compile
        self._step_fn = self._step_tensors if compile == "off" else torch.compile(self._step_tensors, mode=compile)
        # The whole step in one CUDA graph (train.cuda_graph), replayed every step after a few eager ones.
        self._step_graph: StepGraph | None = None
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError(f"a CUDA graph learner step needs a CUDA device, not {self.device}")
            if compile in CUDA_GRAPH_COMPILE_MODES:
                raise ValueError(
                    f"cuda_graph captures the step itself; compile {compile!r} makes CUDA graphs of its own: combine "
                    "it with compile 'default' or 'off'"
                )
            self._step_graph = StepGraph(self._step_fn)
        # Gating samples BC proposals from its own stream, so that the BC branch may run on another thread.
        self.bc_generator = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.critic_updates = 0
        self.actor_updates = 0
        self.acting_precision = "float32"
        self._acting: ActingNetworks | None = None
        self._acting_versions = -1
        self._compact_bc: nn.Module | None = None
        self._acting_tensors: list[torch.Tensor] | None = None
        self._bc_branch_pool: ThreadPoolExecutor | None = None

    # ----------------------------------------------------------------------------------------------------------------
    # Values
    # ----------------------------------------------------------------------------------------------------------------
    @property
    def temperature(self) -> torch.Tensor:
        return self.log_alpha.exp()

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(array, np.float32), device=self.device)

    def obs_tensors(self, obs: dict[str, np.ndarray] | TensorObs) -> TensorObs:
        """A batched observation on the agent's device (images stay uint8)."""
        return obs_lib.to_tensors(obs, self.device)

    def critic_parameters(self) -> list[nn.Parameter]:
        """What the critic loss trains: the ensemble and the observation encoder (the CNNs, with cameras)."""
        return [*self.critics.parameters(), *self.encoder.parameters()]

    def value_parameters(self) -> list[nn.Parameter]:
        """What the V_BC regression trains: V_BC's MLP (the BC encoder it reads stays frozen)."""
        return list(self.value.parameters())

    def augment(self, obs: TensorObs) -> TensorObs:
        """DrQ random shift of every image (cfg.encoder.shift_pad; state untouched)."""
        return augment(obs, self.image_keys, self.cfg.encoder.shift_pad, self.generator)

    def bc_encode(self, obs: TensorObs) -> torch.Tensor:
        """The frozen BC policy's encoder(obs), which its action head and V_BC read."""
        if self.bc_policy is None:
            raise RuntimeError("V_BC and Q^_BC need a BC policy (they read the BC policy's encoding)")
        with torch.no_grad():
            return self.bc_policy.encoder(obs)

    def v_bc(self, obs: TensorObs, *, bc_encoded: torch.Tensor | None = None) -> torch.Tensor:
        """V_BC(s) [B]; obs unnormalised. bc_encoded: bc_encode(obs), when already computed."""
        return self.value(self.bc_encode(obs) if bc_encoded is None else bc_encoded)

    def q_bc_hat(
        self,
        obs: TensorObs,
        actions: torch.Tensor,
        *,
        bonus_cap: float | None = None,
        bc_encoded: torch.Tensor | None = None,
        bc_dist: object | None = None,
    ) -> torch.Tensor:
        """Q^_BC(s, a) = V_BC(s) + alpha * (log pi_BC(a|s) + H(pi_BC(.|s)))  (paper Eq. 6); obs unnormalised.

        bonus_cap, when given, caps alpha * (log pi + H) from above (Q_RL initialisation targets, see
        QEstimationConfig.q_init_bonus_cap). bc_encoded / bc_dist: the BC policy's encoder(obs) and its action
        distribution there, when the caller has them already (gating computes each once per step).
        """
        if bc_encoded is None:
            bc_encoded = self.bc_encode(obs)
        if bc_dist is None:
            bc_dist = self.bc_policy.head(bc_encoded)
        return self.q_bc_from(self.v_bc(obs, bc_encoded=bc_encoded), bc_dist, actions, bonus_cap)

    def q_bc_from(
        self, v: torch.Tensor, bc_dist: object, actions: torch.Tensor, bonus_cap: float | None = None
    ) -> torch.Tensor:
        """Q^_BC from its parts: V_BC(s) and the BC policy's action distribution at s (Eq. 6)."""
        log_prob = bc_dist.log_prob(actions)
        entropy = bc_dist.entropy()
        assert v.shape == log_prob.shape == entropy.shape == (actions.shape[0],), (v.shape, log_prob.shape)
        bonus = self.qest_alpha * (log_prob + entropy)
        if bonus_cap is not None:
            bonus = bonus.clamp_max(bonus_cap)
        return self.clip_value(v + bonus)

    def clip_value(self, q: torch.Tensor) -> torch.Tensor:
        """Clamp to the feasible return range (AgentConfig.value_range) when agent.clip_values is on."""
        if not self.cfg.clip_values:
            return q
        low, high = self.cfg.value_range
        return q.clamp(low, high)

    def q_rl_min(self, obs: TensorObs, actions: torch.Tensor) -> torch.Tensor:
        """min_k Q_RL_k(s, a) over the whole ensemble; obs unnormalised."""
        return self.critics(self.encoder(obs), actions).min(dim=0).values

    # ----------------------------------------------------------------------------------------------------------------
    # Acting: Q-gating
    # ----------------------------------------------------------------------------------------------------------------
    def set_acting_precision(self, precision: str) -> None:
        """What `act` computes with: 'float32' (the agent's own networks) or 'int8' (compact copies: int8 weight-only
        linear layers and bf16 convolutions, robot_rl.compact; for gating on a CPU). The copies follow the agent's
        weights: they are rebuilt at the first `act` after any change to them."""
        if precision not in ("float32", "int8"):
            raise ValueError(f"acting precision must be 'float32' or 'int8', got {precision!r}")
        self.acting_precision = precision
        self._acting = None

    def acting_networks(self) -> ActingNetworks:
        """The networks `act` reads now (compact copies rebuilt when the agent's acting weights changed)."""
        if self.acting_precision == "float32":
            return ActingNetworks(self.encoder, self.actor, self.critics, self.value, self.bc_policy)
        versions = self._acting_weights_version()
        if self._acting is None or versions != self._acting_versions:
            self._acting = self._compact_networks({name: getattr(self, name) for name in self.ACTING_MODULES})
            self._acting_versions = versions
        return self._acting

    def _compact_networks(self, modules: dict[str, nn.Module]) -> ActingNetworks:
        """Compact copies of the float acting `modules` (and of the frozen BC policy, made once)."""
        if self._compact_bc is None and self.bc_policy is not None:
            self._compact_bc = compact_copy(self.bc_policy)
        joint = None if self.bc_policy is None else joint_encoder(modules["encoder"], self.bc_policy.encoder)
        return ActingNetworks(
            **{name: compact_copy(module) for name, module in modules.items()}, bc_policy=self._compact_bc, joint=joint
        )

    def acting_encodings(self, nets: ActingNetworks, obs_t: TensorObs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the critics' encoding, the BC policy's encoding or None: then the BC branch makes it) of obs_t."""
        if nets.joint is not None:
            return nets.joint(obs_t)
        return nets.encoder(obs_t), None

    def _acting_weights_version(self) -> int:
        """Changes whenever any acting weight is written in place (optimiser steps, loads): torch's version counters.
        Writes through `.data`, and to networks built under torch.inference_mode (no counters), are not seen."""
        if self._acting_tensors is None:
            self._acting_tensors = [
                t for name in self.ACTING_MODULES for t in getattr(self, name).state_dict().values()
            ]
        # A learner step replayed from a CUDA graph writes the weights without moving their counters: count steps too.
        return self.actor_updates + sum(0 if t.is_inference() else t._version for t in self._acting_tensors)

    def set_acting_threads(self, threads: int) -> None:
        """1: `act` runs on the calling thread. 2: with Q2RL gating, the BC branch (BC encoder, sample, V_BC, Q^_BC)
        runs on a second thread beside the RL branch (critics' encoder, RL actor, critic ensemble); same results.
        Meant for torch.set_num_threads(1): the two branches then use one core each."""
        if threads not in (1, 2):
            raise ValueError(f"acting threads must be 1 or 2, got {threads}")
        if threads == 2 and self._bc_branch_pool is None:
            self._bc_branch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gating-bc")
        elif threads == 1 and self._bc_branch_pool is not None:
            self._bc_branch_pool.shutdown(wait=True)
            self._bc_branch_pool = None

    @torch.inference_mode()
    def act(
        self, obs: dict[str, np.ndarray], *, rl_action: str | None = None, bc_action: str | None = None
    ) -> GateDecision:
        """Propose a_BC and a_RL and execute the one its Q-function rates higher (paper Eq. 10).

        obs: a batched dict observation (unnormalised, images uint8). With gating 'none' (SAC, RLPD) the RL action is
        always executed. Each encoder runs once per call (the BC policy's distribution is reused for its sample,
        log-prob and entropy). The networks are those of `acting_networks()`; see also `set_acting_threads`.
        """
        rl_mode = rl_action or self.cfg.rl_action
        bc_mode = bc_action or self.cfg.bc_action
        nets = self.acting_networks()
        obs_t = self.obs_tensors(obs)
        gating = "none" if nets.bc_policy is None else self.cfg.gating
        parallel = gating == "q2rl" and self._bc_branch_pool is not None
        bc_branch = bc_encoded = None
        if parallel and nets.joint is None:  # the BC encoder runs beside the critics' encoder
            bc_branch = self._bc_branch_pool.submit(self._bc_branch, nets, obs_t, bc_mode)
        features, bc_encoded = self.acting_encodings(nets, obs_t)
        if parallel and bc_branch is None:
            bc_branch = self._bc_branch_pool.submit(self._bc_branch, nets, obs_t, bc_mode, bc_encoded=bc_encoded)
        a_rl = nets.actor(features)
        a_rl = a_rl.mode() if rl_mode == "mode" else a_rl.sample(generator=self.generator)
        q_rl = self.score_rl(nets, features, a_rl)
        if gating == "q2rl":  # the BC branch scores its own proposal with Q^_BC
            if bc_branch is not None:
                a_bc, q_bc = bc_branch.result()
            else:
                a_bc, q_bc = self._bc_branch(nets, obs_t, bc_mode, bc_encoded=bc_encoded)
        else:  # no gate (NaN proposal), or one Q-function scores both proposals
            if gating == "none":
                a_bc = torch.full_like(a_rl, float("nan"))
            else:
                a_bc, _ = self._bc_branch(nets, obs_t, bc_mode, bc_encoded=bc_encoded, score=False)
            q_bc = self.score_bc(nets, gating, features, None, None, a_bc)
        use_bc = self.gate(q_bc, q_rl, a_bc, a_rl)
        action = torch.where(use_bc[:, None], a_bc, a_rl)
        return GateDecision(
            bc_action=a_bc.cpu().numpy(),
            rl_action=a_rl.cpu().numpy(),
            q_bc=q_bc.cpu().numpy(),
            q_rl=q_rl.cpu().numpy(),
            use_bc=use_bc.cpu().numpy(),
            action=action.cpu().numpy(),
        )

    @torch.inference_mode()  # thread-local: the branch may run on the gating thread
    def _bc_branch(
        self,
        nets: ActingNetworks,
        obs_t: TensorObs,
        bc_mode: str,
        *,
        bc_encoded: torch.Tensor | None = None,
        score: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(a_BC, Q^_BC(s, a_BC) or None): the BC proposal, clipped as the env clips it, and its frozen value."""
        if bc_encoded is None:
            bc_encoded = nets.bc_policy.encoder(obs_t)
        bc_dist = nets.bc_policy.head(bc_encoded)
        raw = bc_dist.mode() if bc_mode == "mode" else bc_dist.sample(self.bc_generator)
        a_bc = raw.clamp(-1.0, 1.0)  # score exactly what would be executed: the env clips every action to [-1, 1]
        return a_bc, self.score_bc(nets, "q2rl", None, bc_encoded, bc_dist, a_bc) if score else None

    @staticmethod
    def gate(q_bc: torch.Tensor, q_rl: torch.Tensor, a_bc: torch.Tensor, a_rl: torch.Tensor) -> torch.Tensor:
        """[B] bool, True where the BC proposal is executed: where Q rates it higher (paper Eq. 10), and wherever the
        RL proposal or its value is not finite while the BC proposal is (networks gone bad are never obeyed). Without
        a BC proposal (NaN, no gating) the RL action is executed."""
        rl_unusable = ~(torch.isfinite(q_rl) & torch.isfinite(a_rl).all(dim=-1))
        return (q_bc > q_rl) | (rl_unusable & torch.isfinite(a_bc).all(dim=-1))

    @staticmethod
    def score_rl(nets: ActingNetworks, features: torch.Tensor, a_rl: torch.Tensor) -> torch.Tensor:
        """Q_RL(s, a_RL) as gating rates the RL proposal: the minimum over the whole critic ensemble [B]."""
        return nets.critics(features, a_rl).min(dim=0).values

    def score_bc(
        self,
        nets: ActingNetworks,
        gating: str,
        features: torch.Tensor | None,
        bc_encoded: torch.Tensor | None,
        bc_dist: object | None,
        a_bc: torch.Tensor,
    ) -> torch.Tensor:
        """The value gating compares with Q_RL(s, a_RL) for the BC proposal a_bc [B]: 'q2rl' the frozen
        Q^_BC(s, a_bc) (needs the BC encoding and distribution), 'none' NaN (never chosen), otherwise the critics'
        minimum at a_bc (needs the critics' features). `act` and `robot-rl replay` both score with this."""
        if gating == "q2rl":
            return self.q_bc_from(nets.value(bc_encoded), bc_dist, a_bc)
        if gating == "none":
            return torch.full((a_bc.shape[0],), float("nan"), device=a_bc.device)
        return self.score_rl(nets, features, a_bc)

    # ----------------------------------------------------------------------------------------------------------------
    # Learning
    # ----------------------------------------------------------------------------------------------------------------
    def _on_device(self, batch: TransitionBatch | dict) -> dict:
        """A minibatch as tensors on the agent's device: numpy (TransitionBatch) is moved there; a dict already there
        (robot_rl.prefetch.to_tensors' or the buffer's device copy's) is taken as it is."""
        return to_tensors(batch, self.device) if isinstance(batch, TransitionBatch) else batch

    def learning_inputs(
        self, batch: dict, obs_shifts: torch.Tensor | None, next_shifts: torch.Tensor | None
    ) -> dict[str, torch.Tensor | TensorObs]:
        """What the updates read from a tensor minibatch: images shifted (DrQ; obs and next_obs at their own offsets,
        `_draws`' 'shifts'), rewards transformed (r~ = scale * r + bias), `not_done` = 1 - terminated."""
        return {
            "obs": shift_obs(batch["obs"], self.image_keys, self.cfg.encoder.shift_pad, obs_shifts),
            "next_obs": shift_obs(batch["next_obs"], self.image_keys, self.cfg.encoder.shift_pad, next_shifts),
            "actions": batch["actions"],
            "rewards": transform_reward(batch["rewards"], self.cfg.reward_scale, self.cfg.reward_bias),
            "not_done": 1.0 - batch["terminated"].to(torch.float32),
            "bc_actions": batch["bc_actions"],
        }

    def autocast(self) -> torch.autocast:
        """bf16 autocast of the learner's forward passes when the agent was built with amp=True (losses, optimiser
        state and weights stay float32); a disabled context otherwise."""
        # A CUDA graph capture needs autocast's cast cache off (torch's CUDA graphs notes).
        cache = self._step_graph is None
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache)

    def td_target(
        self,
        rewards: torch.Tensor,
        not_done: torch.Tensor,
        next_obs: TensorObs,
        *,
        noise: torch.Tensor | None = None,
        members: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """y = r~ + gamma * (1 - terminated) * min over a random subset of target critics at a' ~ pi(s')
        (minus alpha * log pi(a'|s') with backup_entropy). IBRL (method 'ibrl') bootstraps from the better of a' and
        the BC policy's mode at s' under the same critics.

        Truncation is not termination: a step-limit transition keeps its bootstrap (only `terminated` zeroes it).
        noise / members: the random draws (standard normal for a', the subset of critics), drawn here by default.
        """
        if noise is None:
            draws = self._draws(rewards.shape[0], critic=1, actor=False)
            noise, members = draws["noise"][0], draws["members"][0]
        with torch.no_grad():
            next_features = self.encoder(next_obs)
            next_action, next_log_prob = self.actor(next_features).rsample_with_log_prob(noise=noise)
            target_features = self.target_encoder(next_obs)
            q_next = self.target_critics(target_features, next_action, members).min(dim=0).values
            if self.cfg.backup_entropy:
                q_next = q_next - self.temperature * next_log_prob
            if self.cfg.method == "ibrl" and self.bc_policy is not None:
                # IBRL's bootstrap proposal: the BC policy's action at s' competes with a' for the target.
                bc_next = self.bc_policy.head(self.bc_encode(next_obs)).mode().clamp(-1.0, 1.0)
                q_bc_next = self.target_critics(target_features, bc_next, members).min(dim=0).values
                q_next = torch.maximum(q_next, q_bc_next)
            target = self.clip_value(rewards + self.cfg.discount * not_done * q_next)
        assert target.shape == rewards.shape, (target.shape, rewards.shape)
        return target

    def _draws(self, rows: int, *, critic: int, actor: bool) -> dict[str, torch.Tensor | None]:
        """Every random draw of `critic` critic updates and (with `actor`) one actor update on minibatches of `rows`,
        made up front from the agent's generator in two calls, so that the updates themselves draw nothing (they can
        then be compiled and captured whole, and a compiled update reproduces the eager one):

        - 'noise' [critic + actor, rows, action_dim]: standard normal; a' ~ pi(s') of each TD target, then the actor's
          a ~ pi(s);
        - 'members' [critic, critic_subsample]: the target critics of each TD target, distinct and uniformly drawn
          (the first of a random permutation: the order of uniform draws);
        - 'shifts' [2 * critic + actor, cameras, rows, 2]: the DrQ offsets in [0, 2 * shift_pad] of each camera, obs
          then next_obs of each critic update, then the actor's obs; None without cameras or with shift_pad 0.
        """
        n, pad = self.cfg.num_critics, self.cfg.encoder.shift_pad
        images = 2 * critic + int(actor) if pad > 0 and self.image_keys else 0
        shape = (images, len(self.image_keys), rows, 2)
        noise = torch.randn((critic + int(actor), rows, self.action_dim), generator=self.generator, device=self.device)
        uniform = torch.rand(critic * n + math.prod(shape), generator=self.generator, device=self.device)
        members = uniform[: critic * n].view(critic, n).argsort(dim=1)[:, : self.cfg.critic_subsample]
        shifts = (uniform[critic * n :] * (2 * pad + 1)).long().clamp_max(2 * pad).view(shape) if images else None
        return {"noise": noise, "members": members, "shifts": shifts}

    @staticmethod
    def _shifts(draws: dict, i: int) -> torch.Tensor | None:
        return None if draws["shifts"] is None else draws["shifts"][i]

    def critic_update(self, batch: TransitionBatch | dict) -> tuple[float, float]:
        """One critic update alone (eager, outside `update`); returns (loss per member, mean Q)."""
        batch = self._on_device(batch)
        d = self._draws(batch["actions"].shape[0], critic=1, actor=False)
        loss, q_mean = self._critic_tensors(
            batch, d["noise"][0], d["members"][0], self._shifts(d, 0), self._shifts(d, 1)
        )
        self.critic_updates += 1
        return float(loss), float(q_mean)

    def _critic_tensors(
        self,
        batch: dict,
        noise: torch.Tensor,
        members: torch.Tensor,
        obs_shifts: torch.Tensor | None,
        next_shifts: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor work of one critic update, its draws given (what train.compile compiles): the DrQ shifts,
        reward transform, TD target, critic loss, backward, optimiser step and soft update. Returns (loss per member,
        mean Q), on the device."""
        t = self.learning_inputs(batch, obs_shifts, next_shifts)
        with self.autocast():
            target = self.td_target(t["rewards"], t["not_done"], t["next_obs"], noise=noise, members=members).float()
            q = self.critics(self.encoder(t["obs"]), t["actions"]).float()
        assert q.shape == (self.cfg.num_critics, target.shape[0]), q.shape
        # Every member regresses to the same target; summing over members gives each its own full gradient.
        loss = ((q - target.unsqueeze(0)) ** 2).mean(dim=1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        self._soft_update()
        return loss.detach() / self.cfg.num_critics, q.detach().mean()

    def _run_compiled(self, fn: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
        """fn(*args); with torch.compile's CUDA graphs (reduce-overhead and max-autotune on a GPU) each call is a new
        step, and its output is copied out of the graph's memory, which the next replay overwrites."""
        if self.compile_mode not in CUDA_GRAPH_COMPILE_MODES or self.device.type != "cuda":
            return fn(*args)
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args).clone()

    @torch.no_grad()
    def _soft_update(self) -> None:
        """Targets (critics and their encoder) move tau of the way to the online networks."""
        torch._foreach_lerp_(self._targets, self._online, self.cfg.tau)

    def actor_update(self, batch: TransitionBatch | dict) -> dict[str, float]:
        """One actor and temperature update alone (eager, outside `update`); returns its losses and the policy's
        entropy estimate."""
        batch = self._on_device(batch)
        d = self._draws(batch["actions"].shape[0], critic=0, actor=True)
        out = self._actor_tensors(batch, d["noise"][0], self._shifts(d, 0))
        self.actor_updates += 1
        return {k: float(v) for k, v in out.items()}

    def _actor_tensors(
        self, batch: dict, noise: torch.Tensor, obs_shifts: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The tensor work of one actor and temperature update, its draws given (what train.compile compiles)."""
        obs = shift_obs(batch["obs"], self.image_keys, self.cfg.encoder.shift_pad, obs_shifts)
        # The actor sees the critics' features detached: only the critic loss trains the encoder.
        with torch.no_grad(), self.autocast():
            features = self.encoder(obs).float()
        dist = self.actor(features)
        action, log_prob = dist.rsample_with_log_prob(noise=noise)
        # REDQ: the actor ascends the mean over the whole ensemble (or, pessimistic, its minimum).
        with self.autocast():
            q_all = self.critics(features, action).float()
        q = q_all.mean(dim=0) if self.cfg.actor_q == "mean" else q_all.min(dim=0).values
        assert q.shape == log_prob.shape == (features.shape[0],), (q.shape, log_prob.shape)
        sac_loss = (self.temperature.detach() * log_prob - q).mean()
        if self.cfg.normalize_actor_q:
            sac_loss = sac_loss / q.detach().abs().mean().clamp_min(1e-3)
        w = self.cfg.effective_bc_loss_weight
        bc_loss = self.bc_loss(dist.mode(), batch["bc_actions"])
        loss = (1.0 - w) * sac_loss + w * bc_loss if w > 0 else sac_loss
        self.actor_opt.zero_grad(set_to_none=True)
        # Gradients for the actor's weights only: the critics' weight gradients (a third of their backward pass) are
        # neither computed nor left behind.
        loss.backward(inputs=self._actor_params)
        self.actor_opt.step()
        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        return {
            "actor_loss": loss.detach(),
            "sac_loss": sac_loss.detach(),
            "bc_loss": bc_loss.detach(),
            "entropy": -log_prob.detach().mean(),
        }

    @staticmethod
    def bc_loss(rl_mode: torch.Tensor, bc_actions: torch.Tensor) -> torch.Tensor:
        """Squared distance from the RL actor's mode to the BC action proposed at that state.

        Rows without a BC proposal (NaN) are left out; with none at all the loss is zero.
        """
        assert rl_mode.shape == bc_actions.shape, (rl_mode.shape, bc_actions.shape)
        mask = torch.isfinite(bc_actions).all(dim=-1)
        # Masked mean without reading the mask back to the host (no synchronisation on a GPU).
        sq = ((rl_mode - torch.nan_to_num(bc_actions)) ** 2).sum(dim=-1)
        return (sq * mask).sum() / mask.sum().clamp_min(1)

    def _step_tensors(self, batches: list[dict], draws: dict) -> torch.Tensor:
        """The tensor work of one whole learner step, its draws given (what train.compile compiles: one graph, and
        with CUDA graphs one replay, per step): the utd critic updates, then the actor and temperature update on the
        last minibatch. Returns the step's statistics in STEP_STATISTICS order, one float32 tensor on the device."""
        losses, q_mean = [], None
        for k, batch in enumerate(batches):
            shifts = self._shifts(draws, 2 * k), self._shifts(draws, 2 * k + 1)
            loss, q_mean = self._critic_tensors(batch, draws["noise"][k], draws["members"][k], *shifts)
            losses.append(loss)
        actor = self._actor_tensors(batches[-1], draws["noise"][-1], self._shifts(draws, -1))
        temperature = self.temperature.detach()
        parts = {"critic_loss": torch.stack(losses).mean(), "q_mean": q_mean, "temperature": temperature, **actor}
        return torch.stack([parts[name].float() for name in STEP_STATISTICS])

    def update(self, batches: list[TransitionBatch] | list[dict]) -> UpdateStats:
        """One learner step: exactly `utd` critic updates (one per batch) then one actor update (last batch)."""
        if len(batches) != self.cfg.utd:
            raise ValueError(f"update needs exactly utd={self.cfg.utd} batches, got {len(batches)}")
        batches = [self._on_device(batch) for batch in batches]
        rows = {int(batch["actions"].shape[0]) for batch in batches}
        if len(rows) != 1:
            raise ValueError(f"the minibatches of one learner step must be of one size, got sizes {sorted(rows)}")
        draws = self._draws(rows.pop(), critic=len(batches), actor=True)
        if self._step_graph is not None:
            values = self._step_graph(batches, draws)
        else:
            values = self._run_compiled(self._step_fn, batches, draws)
        self.critic_updates += len(batches)
        self.actor_updates += 1
        stats = dict(zip(STEP_STATISTICS, values.tolist(), strict=True))  # one read-back for the whole step
        diverged = {k: v for k, v in stats.items() if not math.isfinite(v)}
        if diverged:
            raise TrainingDiverged(
                f"learner step {self.actor_updates}: non-finite {diverged}: the networks diverged. This step's "
                "weights are neither checkpointed nor broadcast; the last checkpoint is kept. Lower the learning "
                "rates or the reward scale."
            )
        return UpdateStats(
            critic_loss=stats["critic_loss"],
            actor_loss=stats["actor_loss"],
            sac_loss=stats["sac_loss"],
            bc_loss=stats["bc_loss"],
            temperature=stats["temperature"],
            entropy=stats["entropy"],
            q_mean=stats["q_mean"],
            critic_updates=self.critic_updates,
            actor_updates=self.actor_updates,
        )

    def sync_target(self) -> None:
        """Copy the critics (and their encoder) into the targets (after Q-initialisation)."""
        self.target_critics.load_state_dict(self.critics.state_dict())
        self.target_encoder.load_state_dict(self.encoder.state_dict())

    # ----------------------------------------------------------------------------------------------------------------
    # Persistence: tensors for safetensors, everything else for the JSON manifest
    # ----------------------------------------------------------------------------------------------------------------
    NETWORK_MODULES = ("encoder", "target_encoder", "actor", "critics", "target_critics", "value")

    def network_state(self) -> dict[str, torch.Tensor]:
        """Every tensor of encoders, actor, critics, target critics, V_BC and temperature (BC excluded)."""
        state = {}
        for name in self.NETWORK_MODULES:
            for key, value in getattr(self, name).state_dict().items():
                state[f"{name}.{key}"] = value.detach().cpu().contiguous()
        state["log_alpha"] = self.log_alpha.detach().cpu().reshape(1).contiguous()
        return state

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name in self.NETWORK_MODULES:
                getattr(self, name).load_state_dict(_sub_state(state, name), strict=True)
            self.log_alpha.copy_(state["log_alpha"].reshape(()))

    ACTING_MODULES = ("encoder", "actor", "critics", "value")

    def acting_state(self) -> dict[str, torch.Tensor]:
        """The tensors an actor needs for Q-gating (the critics' encoder, RL actor, critic ensemble, V_BC): no targets
        (the BC policy, which V_BC reads, the actor has already)."""
        state = {}
        for name in self.ACTING_MODULES:
            for key, value in getattr(self, name).state_dict().items():
                state[f"{name}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_acting_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what acting_state() produced; names and shapes must match exactly (KeyError/RuntimeError else)."""
        self._check_acting_keys(state)
        with torch.no_grad():
            for name in self.ACTING_MODULES:
                getattr(self, name).load_state_dict(_sub_state(state, name), strict=True)

    def prepare_acting(self, state: dict[str, torch.Tensor]) -> PreparedActing:
        """New acting networks holding `state` (checked as load_acting_state checks it), compacted when the acting
        precision asks for it, built without touching the networks `act` uses now: it may run on another thread while
        the agent acts. `use_acting` swaps them in."""
        self._check_acting_keys(state)
        modules = {name: _holding(getattr(self, name), _sub_state(state, name)) for name in self.ACTING_MODULES}
        compact = self._compact_networks(modules) if self.acting_precision == "int8" else None
        return PreparedActing(modules=modules, compact=compact, precision=self.acting_precision)

    def use_acting(self, prepared: PreparedActing) -> None:
        """Swap in what prepare_acting built (a reference swap, no copy): the agent's acting modules become the
        prepared ones. For an agent that only acts (the actor): optimisers keep pointing at the modules replaced."""
        for name, module in prepared.modules.items():
            setattr(self, name, module)
        self._acting_tensors = None
        if prepared.compact is not None and prepared.precision == self.acting_precision:
            self._acting = prepared.compact
            self._acting_versions = self._acting_weights_version()
        else:  # new module objects: their version counters say nothing about the old copies, so rebuild them
            self._acting = None

    def _check_acting_keys(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"{name}.{key}" for name in self.ACTING_MODULES for key in getattr(self, name).state_dict()}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise KeyError(f"acting state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")

    def optimizer_states(self) -> dict[str, dict]:
        return {
            "actor": self.actor_opt.state_dict(),
            "critic": self.critic_opt.state_dict(),
            "alpha": self.alpha_opt.state_dict(),
        }

    def load_optimizer_states(self, states: dict[str, dict]) -> list[str]:
        """Load saved optimiser states; the learning rates stay the config's (a resume may change them). Returns what
        changed, e.g. ["agent.actor_lr 0.0003 -> 0.0001"]."""
        changed = []
        for name, opt, setting in (
            ("actor", self.actor_opt, "actor_lr"),
            ("critic", self.critic_opt, "critic_lr"),
            ("alpha", self.alpha_opt, "temperature_lr"),
        ):
            opt.load_state_dict(states[name])
            self._own_capturable(opt)
            lr = float(getattr(self.cfg, setting))
            saved = {float(group["lr"]) for group in opt.param_groups}
            if saved != {lr}:
                changed.append(f"agent.{setting} {'/'.join(f'{v:g}' for v in sorted(saved))} -> {lr:g}")
            for group in opt.param_groups:
                group["lr"] = lr
        if self._step_graph is not None:  # new state tensors: a captured step would still read the old ones
            self._step_graph.reset()
        return changed

    def _own_capturable(self, opt: torch.optim.Optimizer) -> None:
        """After load_state_dict: the saved groups' `capturable` (a state saved on a GPU, or on a CPU) replaced ours;
        back to ours, with the step counts where that keeps them (on the parameter's device, or on the CPU)."""
        for group in opt.param_groups:
            group["capturable"] = self._capturable
            for param in group["params"]:
                state = opt.state.get(param, {})
                if "step" in state:
                    where = param.device if self._capturable else torch.device("cpu")
                    state["step"] = state["step"].detach().to(where, torch.float32)


def _holding(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of `module` whose parameters and buffers are copies of `state`'s tensors (its state_dict keys; shapes
    checked, RuntimeError else): each tensor is copied once, straight from `state`, not copied and then overwritten."""
    memo: dict[int, torch.Tensor] = {}
    for key, own in module.state_dict(keep_vars=True).items():
        new = state[key]
        if new.shape != own.shape:
            raise RuntimeError(f"{key}: shape {tuple(new.shape)} received, {tuple(own.shape)} expected")
        new = new.detach().to(device=own.device, dtype=own.dtype, copy=True)
        memo[id(own)] = nn.Parameter(new, requires_grad=own.requires_grad) if isinstance(own, nn.Parameter) else new
    return copy.deepcopy(module, memo)


def _sub_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The entries of `state` under `name.`, without the prefix."""
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def value_regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error with shapes checked (V_BC and Q-initialisation regressions)."""
    assert pred.shape[-1] == target.shape[-1], (pred.shape, target.shape)
    return F.mse_loss(pred, target.expand_as(pred))
