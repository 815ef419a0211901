"""The in-process MuJoCo twin of the FR3 peg-insertion cell.

Importing this package registers the gymnasium id "robot_rl/PegInsertionSim-v0" (once, however often imported).
"""

import gymnasium as gym

ENV_ID = "robot_rl/PegInsertionSim-v0"


def register_envs() -> None:
    """Register the simulated environments with gymnasium unless already registered."""
    if ENV_ID not in gym.registry:
        # No max_episode_steps here: the environment truncates itself at task.max_episode_steps.
        gym.register(id=ENV_ID, entry_point="robot_rl.hardware.sim.peg:make_peg_insertion_env")


register_envs()
