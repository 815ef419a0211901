"""The real FR3 through franky, and its franky-sim twin (the same client against a simulated arm in its own process).

- `FrankyRobot`: the Robot protocol through franky (impedance tracking streamed with `set_reference`).
- `FrankySimServer`: a franky-sim server holding the peg-insertion cell, in a child process.
- `make_franky_env`: the RobotEnv on either, paced by wall-clock deadlines.
"""

from robot_rl.hardware.franka.env import DeadlinePacer, FrankyEnv, OperatorJudgedTask, make_franky_env
from robot_rl.hardware.franka.robot import FrankyRobot, RobotConnectionLost, RobotFault, describe
from robot_rl.hardware.franka.sim_server import FrankySimError, FrankySimServer

__all__ = [
    "DeadlinePacer",
    "FrankyEnv",
    "FrankyRobot",
    "FrankySimError",
    "FrankySimServer",
    "OperatorJudgedTask",
    "RobotConnectionLost",
    "RobotFault",
    "describe",
    "make_franky_env",
]
