"""`MujocoRobot`: the in-process FR3 twin, tracking Cartesian targets with our own impedance law.

The law, computed every `hold_steps` physics steps (design §7, gains of the paper's Table V):

    tau = J^T (K e - D J qdot) + qfrc_bias + N (k_null (q_posture - q) - d_null qdot)

e is the tool-centre point's pose error in the base frame (orientation error from `mju_subQuat`, rotated into the
base frame), qfrc_bias compensates gravity and Coriolis forces exactly, and N = I - J^T pinv(J^T) projects a weak
posture spring into the null space of the task, keeping the redundant elbow near the reset configuration. Like
franky's tracking motion, the pose error is clipped, so a distant target does not ask for unbounded force.

Speed notes (shared/research/sim-facts.md): the Jacobian comes from `mj_jacSite` into preallocated arrays, there is no
np.cross, and the null-space projector (a pseudo-inverse) is computed once per `advance` call, not per physics step.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

import mujoco
import numpy as np

from robot_rl.config import ImpedanceConfig
from robot_rl.hardware.interfaces import Pose, RobotState
from robot_rl.hardware.sim.scene import ARM_JOINTS, TCP_SITE, PegScene

TORQUE_LIMIT = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])  # FR3 joint torque limits, Nm
ERROR_CLIP_M = 0.1  # franky CartesianImpedanceTrackingMotion's translational_error_clip
ERROR_CLIP_RAD = 0.25  # ... and rotational_error_clip
NULLSPACE_STIFFNESS = 10.0  # Nm/rad: weak, only keeps the elbow from drifting
NULLSPACE_DAMPING = 2.0 * np.sqrt(NULLSPACE_STIFFNESS)


class IKError(RuntimeError):
    """Inverse kinematics did not reach the requested pose (unreachable or beyond the joint limits)."""


class MujocoRobot:
    """The Robot protocol on a MuJoCo model of the FR3; `advance(seconds)` moves the simulated clock.

    `hold_steps` physics steps share one torque computation (2 was measured faster and still stable at 2 ms).
    """

    def __init__(self, scene: PegScene, *, impedance: ImpedanceConfig, hold_steps: int = 2) -> None:
        if hold_steps < 1:
            raise ValueError(f"hold_steps must be at least 1, got {hold_steps}")
        self.scene = scene
        self.model = scene.model
        self.data = mujoco.MjData(self.model)
        self._ik_data = mujoco.MjData(self.model)
        self._site = self.model.site(TCP_SITE).id
        self._dofs = _arm_dofs(self.model)
        self._hold_steps = hold_steps
        self._stiffness = np.array(impedance.stiffness, dtype=np.float64)
        self._damping = np.array(impedance.damping, dtype=np.float64)
        self._error_clip = np.array([ERROR_CLIP_M] * 3 + [ERROR_CLIP_RAD] * 3)
        self._ranges = self.model.jnt_range[[self.model.joint(n).id for n in ARM_JOINTS]].copy()
        # Preallocated work arrays for the inner loop.
        nv = self.model.nv
        self._jac = np.zeros((6, nv))
        self._quat = np.zeros(4)
        self._rot_local = np.zeros(3)
        self._error = np.zeros(6)
        self._nullspace = np.eye(nv)
        self._target_pos = np.zeros(3)
        self._target_quat = np.array([1.0, 0.0, 0.0, 0.0])
        self.posture = self._solve_ik(scene.reference.pos, scene.reference.quat, scene.seed_q)
        self._place(self.posture)

    # ------------------------------------------------------------------------------------------------------------
    # Robot protocol
    # ------------------------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def state(self) -> RobotState:
        """The tool-centre point pose and joint state at the current simulated time."""
        d = self.data
        quat = np.zeros(4)
        mujoco.mju_mat2Quat(quat, d.site_xmat[self._site])
        return RobotState(
            ee_pos=d.site_xpos[self._site].copy(),
            ee_quat=quat,
            joint_pos=d.qpos[self._dofs].copy(),
            joint_vel=d.qvel[self._dofs].copy(),
            time=float(d.time),
        )

    def command(self, target_pos: np.ndarray, target_quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Set the impedance target; returns (pos, unit quat) as used by the controller."""
        pos, quat = _checked_pose(target_pos, target_quat)
        self._target_pos[:] = pos
        self._target_quat[:] = quat
        return pos.copy(), quat.copy()

    def move_to(self, pos: np.ndarray, quat: np.ndarray) -> None:
        """Reset helper: place the arm at the pose by inverse kinematics (from the posture, so deterministic), at
        rest, and hold it there. Physics state other than the clock is reset too (contacts, warm starts)."""
        pos, quat = _checked_pose(pos, quat)
        q = self._solve_ik(pos, quat, self.posture)
        self._place(q)
        self.command(pos, quat)

    def stop(self) -> None:
        """Hold the current pose."""
        s = self.state()
        self.command(s.ee_pos, s.ee_quat)

    def recover(self) -> bool:
        """Nothing to recover from in simulation."""
        return True

    # ------------------------------------------------------------------------------------------------------------
    # Simulation clock
    # ------------------------------------------------------------------------------------------------------------
    @property
    def target(self) -> Pose:
        """The impedance target now tracked (a copy)."""
        return Pose(pos=self._target_pos.copy(), quat=self._target_quat.copy())

    def advance(self, seconds: float) -> None:
        """Run the physics for `seconds` (rounded to whole physics steps) under the impedance law."""
        m, d = self.model, self.data
        steps = round(seconds / m.opt.timestep)
        if steps < 0:
            raise ValueError(f"cannot advance by a negative time {seconds}")
        self._update_nullspace()
        done = 0
        while done < steps:
            mujoco.mj_step1(m, d)
            d.qfrc_applied[:] = self._impedance_torque()
            mujoco.mj_step2(m, d)
            for _ in range(min(self._hold_steps, steps - done) - 1):
                mujoco.mj_step(m, d)  # the same qfrc_applied is held
            done += self._hold_steps
        # Positions, contacts and sites consistent with the new state, for state() and the success detector.
        mujoco.mj_forward(m, d)

    # ------------------------------------------------------------------------------------------------------------
    # Control law
    # ------------------------------------------------------------------------------------------------------------
    def _impedance_torque(self) -> np.ndarray:
        # The model has exactly the seven arm joints (checked in _arm_dofs), so whole arrays are the arm's: no copies.
        d, jac, err = self.data, self._jac, self._error
        mujoco.mj_jacSite(self.model, d, jac[:3], jac[3:], self._site)
        err[:3] = self._target_pos - d.site_xpos[self._site]
        mujoco.mju_mat2Quat(self._quat, d.site_xmat[self._site])
        # mju_subQuat gives the rotation from current to target in the current (site) frame; rotate to base frame.
        mujoco.mju_subQuat(self._rot_local, self._target_quat, self._quat)
        err[3:] = d.site_xmat[self._site].reshape(3, 3) @ self._rot_local
        np.clip(err, -self._error_clip, self._error_clip, out=err)
        wrench = self._stiffness * err - self._damping * (jac @ d.qvel)
        posture = NULLSPACE_STIFFNESS * (self.posture - d.qpos) - NULLSPACE_DAMPING * d.qvel
        tau = jac.T @ wrench + d.qfrc_bias + self._nullspace @ posture
        return np.clip(tau, -TORQUE_LIMIT, TORQUE_LIMIT, out=tau)

    def _update_nullspace(self) -> None:
        mujoco.mj_jacSite(self.model, self.data, self._jac[:3], self._jac[3:], self._site)
        jt = self._jac.T
        self._nullspace = np.eye(self.model.nv) - jt @ np.linalg.pinv(jt)

    # ------------------------------------------------------------------------------------------------------------
    # Resets
    # ------------------------------------------------------------------------------------------------------------
    def _place(self, q: np.ndarray) -> None:
        m, d = self.model, self.data
        clock = d.time
        mujoco.mj_resetData(m, d)
        d.time = clock
        d.qpos[self._dofs] = q
        mujoco.mj_forward(m, d)
        self.stop()

    def _solve_ik(self, pos: np.ndarray, quat: np.ndarray, seed: np.ndarray) -> np.ndarray:
        """Damped least squares on the tool-centre point, with the rest of the motion pulled towards `seed`."""
        m, d = self.model, self._ik_data
        q = np.array(seed, dtype=np.float64)
        jac, err, cur, rot = np.zeros((6, m.nv)), np.zeros(6), np.zeros(4), np.zeros(3)
        damping = 1e-4 * np.eye(6)
        for _ in range(200):
            d.qpos[self._dofs] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            err[:3] = pos - d.site_xpos[self._site]
            mujoco.mju_mat2Quat(cur, d.site_xmat[self._site])
            mujoco.mju_subQuat(rot, quat, cur)
            err[3:] = d.site_xmat[self._site].reshape(3, 3) @ rot
            if np.max(np.abs(err)) < 1e-9:
                break
            mujoco.mj_jacSite(m, d, jac[:3], jac[3:], self._site)
            j = jac[:, self._dofs]
            step = j.T @ np.linalg.solve(j @ j.T + damping, err)
            null = np.eye(len(q)) - np.linalg.pinv(j) @ j
            q = np.clip(q + step + 0.1 * null @ (seed - q), self._ranges[:, 0], self._ranges[:, 1])
        if np.max(np.abs(err)) > 1e-6:
            raise IKError(f"no joint configuration reaches pos={pos}, quat={quat} (residual {np.abs(err).max():.2e})")
        return q


def _arm_dofs(model: mujoco.MjModel) -> np.ndarray:
    """Indices of the seven arm joints, which must be the model's only degrees of freedom, in order (the control law
    uses whole qpos/qvel arrays to avoid copies)."""
    dofs = np.array([model.jnt_dofadr[model.joint(n).id] for n in ARM_JOINTS])
    qpos = np.array([model.jnt_qposadr[model.joint(n).id] for n in ARM_JOINTS])
    if model.nq != 7 or model.nv != 7 or not (np.array_equal(dofs, np.arange(7)) and np.array_equal(qpos, dofs)):
        raise ValueError("the arm model must have exactly the seven FR3 hinge joints, in order")
    return dofs


def _checked_pose(pos: np.ndarray, quat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(quat, dtype=np.float64)
    if p.shape != (3,) or q.shape != (4,) or not (np.all(np.isfinite(p)) and np.all(np.isfinite(q))):
        raise ValueError(f"pose must be a finite position (3,) and quaternion (4,), got {p!r}, {q!r}")
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise ValueError(f"quaternion {q!r} has no direction")
    return p, q / norm
