"""robot_rl: on-robot reinforcement learning that improves a behaviour-cloning policy (Q2RL)."""

__version__ = "0.1.0"


def _register() -> None:
    # Registration only records an entry-point string; nothing heavy is imported until gymnasium.make is called.
    from robot_rl.envs import register_envs

    register_envs()


_register()
