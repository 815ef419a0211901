"""Small pose math: roll-pitch-yaw, rotation matrices and unit quaternions (w, x, y, z), numpy only.

Conventions (the same as MuJoCo and franky's `Affine`, apart from franky's x, y, z, w quaternion order):
- rpy = (roll, pitch, yaw) are extrinsic rotations about the fixed x, then y, then z axes, so
  R = Rz(yaw) @ Ry(pitch) @ Rx(roll).
- Quaternions are unit, scalar first (w, x, y, z). `quat_canonical` picks the sign with w >= 0.
"""

from __future__ import annotations

import numpy as np

Array = np.ndarray


def rpy_to_matrix(rpy: Array) -> Array:
    """Rotation matrix of extrinsic x-y-z (roll, pitch, yaw) angles: Rz(yaw) @ Ry(pitch) @ Rx(roll)."""
    roll, pitch, yaw = (float(v) for v in rpy)
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    return np.array(
        [
            [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
            [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
            [-sp, cp * sr, cp * cr],
        ]
    )


def matrix_to_rpy(rot: Array) -> Array:
    """Inverse of `rpy_to_matrix`; pitch in [-pi/2, pi/2], roll and yaw in (-pi, pi]."""
    r = np.asarray(rot, dtype=float).reshape(3, 3)
    pitch = np.arcsin(np.clip(-r[2, 0], -1.0, 1.0))
    roll = np.arctan2(r[2, 1], r[2, 2])
    yaw = np.arctan2(r[1, 0], r[0, 0])
    return np.array([roll, pitch, yaw])


def quat_canonical(quat: Array) -> Array:
    """The unit quaternion with w >= 0 (q and -q are the same rotation)."""
    q = np.asarray(quat, dtype=float)
    q = q / np.linalg.norm(q)
    return -q if q[0] < 0 else q


def matrix_to_quat(rot: Array) -> Array:
    """Unit quaternion (w, x, y, z), w >= 0, of a rotation matrix (Shepperd's method, stable for all angles)."""
    r = np.asarray(rot, dtype=float).reshape(3, 3)
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        q = [0.25 * s, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s]
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        q = [(r[2, 1] - r[1, 2]) / s, 0.25 * s, (r[0, 1] + r[1, 0]) / s, (r[0, 2] + r[2, 0]) / s]
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        q = [(r[0, 2] - r[2, 0]) / s, (r[0, 1] + r[1, 0]) / s, 0.25 * s, (r[1, 2] + r[2, 1]) / s]
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        q = [(r[1, 0] - r[0, 1]) / s, (r[0, 2] + r[2, 0]) / s, (r[1, 2] + r[2, 1]) / s, 0.25 * s]
    return quat_canonical(np.array(q))


def quat_to_matrix(quat: Array) -> Array:
    """Rotation matrix of a quaternion (w, x, y, z); the quaternion is normalised first."""
    w, x, y, z = np.asarray(quat, dtype=float) / np.linalg.norm(quat)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def rpy_to_quat(rpy: Array) -> Array:
    """Quaternion (w, x, y, z) of extrinsic x-y-z (roll, pitch, yaw) angles."""
    return matrix_to_quat(rpy_to_matrix(rpy))


def quat_to_rpy(quat: Array) -> Array:
    """Roll, pitch, yaw of a quaternion (w, x, y, z)."""
    return matrix_to_rpy(quat_to_matrix(quat))


def quat_multiply(a: Array, b: Array) -> Array:
    """Hamilton product a * b (apply b first, then a)."""
    aw, ax, ay, az = np.asarray(a, dtype=float)
    bw, bx, by, bz = np.asarray(b, dtype=float)
    return np.array(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ]
    )


def quat_conjugate(quat: Array) -> Array:
    """Inverse of a unit quaternion."""
    q = np.asarray(quat, dtype=float)
    return np.array([q[0], -q[1], -q[2], -q[3]])


def quat_angle(a: Array, b: Array) -> float:
    """Angle in radians of the rotation between two orientations."""
    dot = abs(float(np.dot(np.asarray(a, dtype=float), np.asarray(b, dtype=float))))
    dot /= float(np.linalg.norm(a) * np.linalg.norm(b))
    return 2.0 * float(np.arccos(min(1.0, dot)))
