"""The MuJoCo model of the FR3 peg-insertion cell: the FR3 from franky-sim, a square peg in the hand, a board.

The arm is franky-sim's `fr3.xml` (so this twin and the franky-sim twin share one arm model) with its position
actuators, finger joints and keyframe removed: our own impedance law applies joint torques, and the fingers are fixed
around the peg. Physics settings are those measured to work in `shared/research/sim-facts.md`.

Frames: the hand's z axis points along the peg (down at the reference). The tool-centre point is the site "tcp" at
the peg tip, oriented like the hand. The hole's top centre is at `PegScene.hole_top`; the board's sides run along
the base x and y axes, as do the peg's sides at the reference orientation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import mujoco
import numpy as np

from robot_rl.config import SimTaskConfig
from robot_rl.hardware.interfaces import Pose
from robot_rl.hardware.pose import matrix_to_quat

ARM_JOINTS = tuple(f"fr3_joint{i}" for i in range(1, 8))
TCP_SITE = "tcp"
CAMERAS = ("front", "wrist")

# Where the board sits: in front of the robot, low enough that a "hand pointing down" pose above it is comfortable.
HOLE_XY = (0.5, 0.0)
BOARD_TOP_Z = 0.1
BOARD_HALF_SIZE = 0.075
BASE_PLATE_THICKNESS = 0.01
# Hand frame: the Franka TCP (centre of the finger pads) is 0.1034 m along the hand's z axis.
HAND_TCP_Z = 0.1034
PEG_GRIP_LENGTH = 0.02  # peg length held between the fingers, above the TCP
# Finger pad inner face sits this far from the finger joint's zero (pad box centre 0.0055, half width 0.004).
FINGER_PAD_OFFSET = 0.0015
# Reference orientation: hand z down, hand x along base x (the peg's sides along the board's).
REFERENCE_QUAT = np.array([0.0, 1.0, 0.0, 0.0])
# A hand-down configuration near the reference, to seed inverse kinematics.
SEED_Q = np.array([0.0, 0.2, 0.0, -2.2, 0.0, 2.4, 0.785])
# Collision bits: robot parts touch the scene, never each other; scene parts never touch each other.
ROBOT_BIT, SCENE_BIT = 1, 2
# Links close to the hand can reach the board; the others never do, so their collisions are switched off for speed.
COLLIDING_LINKS = ("fr3_link6", "fr3_link7", "hand")
STIFF_SOLREF = (0.004, 1.0)  # the default soft contact lets the peg sink 0.6 mm, more than the clearance


@dataclass(frozen=True)
class PegScene:
    """A compiled peg-insertion model and the privileged facts about it a twin and a success detector need."""

    model: mujoco.MjModel
    task: SimTaskConfig
    hole_top: np.ndarray
    """World position (3,) of the centre of the hole's opening (top face of the board)."""
    hole_half_width_m: float
    reference: Pose
    """Peg tip `reference_height_m` above the hole, peg vertical and aligned with the hole."""
    seed_q: np.ndarray
    """A joint configuration near the reference, to seed inverse kinematics."""


def fr3_xml_path() -> Path:
    """franky-sim's FR3 model file (installed with the package; nothing is downloaded)."""
    spec = importlib.util.find_spec("franky_sim")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("franky-sim is not installed; it provides the FR3 model (pip install franky-sim)")
    path = Path(spec.origin).parent / "assets" / "fr3.xml"
    if not path.is_file():
        raise FileNotFoundError(f"FR3 model not found at {path}")
    return path


def build_scene(task: SimTaskConfig, *, visual_meshes: bool = False) -> PegScene:
    """Compile the cell. `visual_meshes=False` drops the detailed arm meshes (242k faces) and renders the collision
    meshes instead: the dynamics are identical (every link has an explicit inertial) and rendering is ~10x faster."""
    spec = _load_arm(task)
    if not visual_meshes:
        _drop_visual_meshes(spec)
    _set_arm_collisions(spec)
    _add_peg(spec, task)
    hole_top = np.array([HOLE_XY[0], HOLE_XY[1], BOARD_TOP_Z])
    half_width = task.peg_half_width_m + task.clearance_m
    _add_board(spec, task, hole_top, half_width)
    _add_lights_and_cameras(spec, hole_top)
    model = spec.compile()
    reference = Pose(pos=hole_top + np.array([0.0, 0.0, task.reference_height_m]), quat=REFERENCE_QUAT.copy())
    return PegScene(
        model=model,
        task=task,
        hole_top=hole_top,
        hole_half_width_m=half_width,
        reference=reference,
        seed_q=SEED_Q.copy(),
    )


def _load_arm(task: SimTaskConfig) -> mujoco.MjSpec:
    path = fr3_xml_path()
    spec = mujoco.MjSpec.from_file(str(path))
    spec.meshdir = str(path.parent / "meshes")  # the file says "assets"; the meshes are in assets/meshes
    spec.modelname = "fr3_peg_insertion"
    spec.option.timestep = task.physics_dt_s
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.option.cone = mujoco.mjtCone.mjCONE_PYRAMIDAL
    # We apply joint torques ourselves; the fingers are fixed around the peg (the gripper is disabled in this task).
    for element in [*spec.actuators, *spec.tendons, *spec.equalities, *spec.keys]:
        spec.delete(element)
    for joint in list(spec.joints):
        if joint.name.startswith("finger_joint"):
            spec.delete(joint)
        else:
            # A real FR3 compensates most joint friction with its torque sensors (an assumption); the model's full
            # friction loss leaves 1-2 mm of stiction, more than the clearance.
            joint.frictionloss = joint.frictionloss * task.joint_friction_scale
    finger_open = task.peg_half_width_m - FINGER_PAD_OFFSET
    # The right finger is turned half a turn about z, so its own +y is the hand's -y: mirrored offsets open both.
    spec.body("left_finger").pos = [0.0, finger_open, 0.0584]
    spec.body("right_finger").pos = [0.0, -finger_open, 0.0584]
    return spec


def _drop_visual_meshes(spec: mujoco.MjSpec) -> None:
    for geom in list(spec.geoms):
        if geom.type == mujoco.mjtGeom.mjGEOM_MESH and geom.contype == 0 and geom.conaffinity == 0:
            spec.delete(geom)
    still_used = {geom.meshname for geom in spec.geoms}
    for mesh in list(spec.meshes):
        if mesh.name not in still_used:
            spec.delete(mesh)
    # Show the low-poly collision shapes in the default render groups instead.
    for geom in spec.geoms:
        geom.group = 2
        geom.rgba = [0.85, 0.85, 0.85, 1.0]


def _set_arm_collisions(spec: mujoco.MjSpec) -> None:
    colliding = {name: _subtree_bodies(spec.body(name)) for name in COLLIDING_LINKS}
    near_hand = set().union(*colliding.values())
    for geom in spec.geoms:
        if geom.contype == 0 and geom.conaffinity == 0:
            continue  # visual only
        on = geom.parent.name in near_hand
        geom.contype = ROBOT_BIT if on else 0
        geom.conaffinity = SCENE_BIT if on else 0


def _subtree_bodies(body: mujoco.MjsBody) -> set[str]:
    names = {body.name}
    for child in body.bodies:
        names |= _subtree_bodies(child)
    return names


def _add_peg(spec: mujoco.MjSpec, task: SimTaskConfig) -> None:
    hand = spec.body("hand")
    w = task.peg_half_width_m
    top = HAND_TCP_Z - PEG_GRIP_LENGTH
    tip = HAND_TCP_Z + task.peg_length_m
    # The peg is a geom of the hand body itself: parent-child filtering keeps it from touching the fingers.
    hand.add_geom(
        name="peg",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        size=[w, w, (tip - top) / 2],
        pos=[0.0, 0.0, (tip + top) / 2],
        mass=0.05,
        contype=ROBOT_BIT,
        conaffinity=SCENE_BIT,
        condim=3,
        solref=list(STIFF_SOLREF),
        rgba=[0.9, 0.45, 0.1, 1.0],
        group=2,
    )
    hand.add_site(name=TCP_SITE, pos=[0.0, 0.0, tip], size=[0.002, 0.002, 0.002], group=4)


def _add_board(spec: mujoco.MjSpec, task: SimTaskConfig, hole_top: np.ndarray, half_width: float) -> None:
    board = spec.worldbody.add_body(name="board", pos=hole_top.tolist())
    depth, big, h = task.hole_depth_m, BOARD_HALF_SIZE, half_width
    side = (big - h) / 2
    # Four blocks around the square hole (x: -big..-h and h..big across the whole board; y: the middle strip).
    blocks = {
        "board_px": ([(big + h) / 2, 0.0], [side, big]),
        "board_nx": ([-(big + h) / 2, 0.0], [side, big]),
        "board_py": ([0.0, (big + h) / 2], [h, side]),
        "board_ny": ([0.0, -(big + h) / 2], [h, side]),
    }
    for name, (xy, half_xy) in blocks.items():
        board.add_geom(name=name, pos=[*xy, -depth / 2], size=[*half_xy, depth / 2], **_board_geom())
    plate = BASE_PLATE_THICKNESS / 2
    bottom = {**_board_geom(), "rgba": [0.1, 0.1, 0.12, 1.0]}  # dark, so the hole stands out in images
    board.add_geom(name="board_bottom", pos=[0.0, 0.0, -depth - plate], size=[big, big, plate], **bottom)
    table_top = hole_top[2] - depth - BASE_PLATE_THICKNESS
    spec.worldbody.add_geom(
        name="table",
        type=mujoco.mjtGeom.mjGEOM_BOX,
        pos=[hole_top[0], hole_top[1], table_top / 2],
        size=[0.3, 0.4, table_top / 2],
        contype=SCENE_BIT,
        conaffinity=ROBOT_BIT,
        rgba=[0.45, 0.35, 0.25, 1.0],
    )
    spec.worldbody.add_geom(
        name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[2, 2, 0.1], contype=0, conaffinity=0, rgba=[0.3] * 3 + [1]
    )


def _board_geom() -> dict:
    return {
        "type": mujoco.mjtGeom.mjGEOM_BOX,
        "contype": SCENE_BIT,
        "conaffinity": ROBOT_BIT,
        "condim": 3,
        "solref": list(STIFF_SOLREF),
        "rgba": [0.2, 0.35, 0.6, 1.0],
    }


def _add_lights_and_cameras(spec: mujoco.MjSpec, hole_top: np.ndarray) -> None:
    spec.worldbody.add_light(name="top", pos=[0.5, 0.0, 1.5], dir=[0.0, 0.0, -1.0], castshadow=False)
    front_eye = hole_top + np.array([0.3, 0.25, 0.3])  # in front and to the side, above: the arm hides less
    spec.worldbody.add_camera(
        name="front", pos=front_eye.tolist(), quat=look_at_quat(front_eye, hole_top).tolist(), fovy=45
    )
    # Wrist camera on the hand, beside the fingers, looking down the peg towards its tip (hand frame).
    hand = spec.body("hand")
    eye = np.array([0.09, 0.0, 0.03])
    tip = np.array([0.0, 0.0, HAND_TCP_Z + 0.12])  # aim past the peg tip: the board around the hole shows
    hand.add_camera(
        name="wrist", pos=eye.tolist(), quat=look_at_quat(eye, tip, up=np.array([1.0, 0.0, 0.0])).tolist(), fovy=60
    )


def look_at_quat(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """Orientation (w, x, y, z) of a MuJoCo camera at `eye` looking at `target` (cameras look along their -z)."""
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=float)
    back = np.asarray(eye, dtype=float) - np.asarray(target, dtype=float)
    z = back / np.linalg.norm(back)
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return matrix_to_quat(np.column_stack([x, y, z]))
