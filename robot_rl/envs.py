"""Builds the environment a config names (the composition root for envs)."""

from __future__ import annotations

import gymnasium as gym

from robot_rl.config import EnvConfig

SIM_PEG_ENV_ID = "robot_rl/PegInsertionSim-v0"


def make_env(cfg: EnvConfig) -> gym.Env:
    """The env for `cfg.robot`: the in-process MuJoCo twin, or franky's client (real arm or franky-sim server)."""
    if cfg.robot == "sim":
        from robot_rl.hardware.sim.peg import make_peg_insertion_env

        return make_peg_insertion_env(cfg)
    if cfg.robot == "franky":
        from robot_rl.hardware.franka.env import make_franky_env

        return make_franky_env(cfg)
    raise ValueError(f"env.robot {cfg.robot!r} has no implementation")


def register_envs() -> None:
    """Register robot_rl's gymnasium ids (idempotent); `gymnasium.make(SIM_PEG_ENV_ID)` works after this."""
    if SIM_PEG_ENV_ID not in gym.registry:
        gym.register(id=SIM_PEG_ENV_ID, entry_point="robot_rl.hardware.sim.peg:make_peg_insertion_env")
