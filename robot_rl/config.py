"""One typed configuration tree for every command.

Every config is YAML validated by pydantic with `extra="forbid"`; `--set path.to.field=value` overrides any field
(the value is parsed as YAML); a bad value is refused before anything starts, with the field's path in the message.
Functions receive the slice of the tree they need, never the whole tree.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# RobotEnv's state observation: the end-effector pose relative to the reference; camera images sit beside it under
# the cameras' names.
STATE_OBS_KEY = "ee_pose"

Vec3 = tuple[float, float, float]
Vec6 = tuple[float, float, float, float, float, float]
AXES6 = ("x", "y", "z", "roll", "pitch", "yaw")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field path and the problem."""


class Strict(BaseModel):
    """Base of every config and message model: unknown fields, NaN and infinities are refused, assignments
    validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: Any) -> Any:
        """pydantic reads true as 1 and false as 0 for a number: `seed: true` or `lr: false` is a typo, refused."""
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _holds_bool(value) and not _admits_bool(field.annotation):
            raise ValueError("true/false where a number is expected")
        return value


def _holds_bool(value: Any) -> bool:
    """Whether a raw value is a bool or a list/tuple holding one (nested)."""
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(_holds_bool(v) for v in value)


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes a bool anywhere in it (bool, Any, a union or container with one, a model)."""
    if annotation is bool or annotation is Any:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_admits_bool(arg) for arg in typing.get_args(annotation) if arg is not Ellipsis)


# Ceilings of what a config may send to a real arm: a typo (0.5 for 0.05 m) is refused, not executed. The box is the
# commanded target's range around the reference pose; the gains are Cartesian impedance gains (franky passes them to
# libfranka's torque controller: far stiffer than these turns contact into large, fast torques).
MAX_BOX_M = 0.3
MAX_BOX_DEG = 60.0
MAX_STIFFNESS = (3000.0, 3000.0, 3000.0, 300.0, 300.0, 300.0)  # N/m, Nm/rad
MAX_DAMPING = (250.0, 250.0, 250.0, 50.0, 50.0, 50.0)  # Ns/m, Nms/rad
# Floor of the damping ratio D / (2 sqrt(K)) per axis (unit mass and inertia, the convention of the paper's gains: the
# defaults are 1.0 translational, 0.5 rotational). Positive damping alone is no limit: an arm damped far below critical
# swings about its target, so the target no longer bounds where the arm goes. A quarter of critical leaves a margin
# below the paper's 0.5.
MIN_DAMPING_RATIO = 0.25


# --------------------------------------------------------------------------------------------------------------------
# Robot, action and safety
# --------------------------------------------------------------------------------------------------------------------
class SafetyBoxConfig(Strict):
    """Limits of the commanded end-effector target around the reference pose (paper Table V)."""

    xyz_low: Vec3 = Field(
        (-0.05, -0.05, -0.08), description=f"Lower xyz limit in metres, relative to the reference (>= -{MAX_BOX_M})."
    )
    xyz_high: Vec3 = Field(
        (0.05, 0.05, 0.06), description=f"Upper xyz limit in metres, relative to the reference (<= {MAX_BOX_M})."
    )
    rpy_low_deg: Vec3 = Field(
        (-5.0, -5.0, -20.0), description=f"Lower roll/pitch/yaw limit in degrees (>= -{MAX_BOX_DEG:g})."
    )
    rpy_high_deg: Vec3 = Field(
        (5.0, 5.0, 20.0), description=f"Upper roll/pitch/yaw limit in degrees (<= {MAX_BOX_DEG:g})."
    )

    @model_validator(mode="after")
    def _low_below_high(self) -> SafetyBoxConfig:
        for name, low, high, most, unit in (
            ("xyz", self.xyz_low, self.xyz_high, MAX_BOX_M, "m"),
            ("rpy_deg", self.rpy_low_deg, self.rpy_high_deg, MAX_BOX_DEG, "degrees"),
        ):
            for axis, lo, hi in zip("xyz" if name == "xyz" else "rpy", low, high, strict=True):
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError(f"{name} limits must be finite (axis {axis}: {lo}, {hi})")
                if not lo < hi:
                    raise ValueError(f"{name} low must be below high on axis {axis}: {lo} >= {hi}")
                if not lo <= 0.0 <= hi:
                    raise ValueError(f"{name} limits must contain the reference (0) on axis {axis}: [{lo}, {hi}]")
                if lo < -most or hi > most:
                    raise ValueError(
                        f"{name} limits reach beyond ±{most:g} {unit} of the reference on axis {axis}: [{lo}, {hi}]; "
                        "the box bounds every target sent to the arm"
                    )
        return self


class ActionConfig(Strict):
    """How a policy action in [-1, 1]^6 becomes a new end-effector target."""

    translation_scale_m: float = Field(0.015, gt=0, le=0.05, description="Metres per unit action per step.")
    rotation_scale_rad: float = Field(0.02625, gt=0, le=0.2, description="Radians per unit action per step.")
    max_target_error_m: float = Field(
        0.015,
        gt=0,
        le=0.1,
        description="The target is kept within this distance (per axis) of the measured pose.",
    )
    max_target_error_rad: float = Field(
        0.05,
        gt=0,
        le=0.5,
        description="The target is kept within this angle (per axis) of the measured pose.",
    )


class ImpedanceConfig(Strict):
    """Cartesian impedance gains (paper Table V), in the order x, y, z, roll, pitch, yaw."""

    stiffness: Vec6 = Field(
        (1024.0, 1024.0, 1024.0, 100.0, 100.0, 100.0), description=f"N/m and Nm/rad, at most {list(MAX_STIFFNESS)}."
    )
    damping: Vec6 = Field(
        (64.0, 64.0, 64.0, 10.0, 10.0, 10.0), description=f"Ns/m and Nms/rad, at most {list(MAX_DAMPING)}."
    )

    @model_validator(mode="after")
    def _positive(self) -> ImpedanceConfig:
        for name, values, most in (
            ("stiffness", self.stiffness, MAX_STIFFNESS),
            ("damping", self.damping, MAX_DAMPING),
        ):
            if any(not math.isfinite(v) or v <= 0 for v in values):
                raise ValueError(f"{name} must be finite and positive, got {values}")
            over = [f"{axis} {v:g} > {m:g}" for axis, v, m in zip(AXES6, values, most, strict=True) if v > m]
            if over:
                raise ValueError(f"{name} above what is sent to an arm ({', '.join(over)}): got {values}")
        # The ceilings above keep every needed damping below MAX_DAMPING. Shown rounded up: what is shown passes.
        needed = [MIN_DAMPING_RATIO * 2.0 * math.sqrt(k) for k in self.stiffness]
        shown = [math.ceil(n * 1000.0) / 1000.0 for n in needed]
        under = [
            f"{axis} {d:g} < {m:g}" for axis, d, n, m in zip(AXES6, self.damping, needed, shown, strict=True) if d < n
        ]
        if under:
            raise ValueError(
                f"damping too low for the stiffness ({', '.join(under)}): each axis needs damping >= "
                f"{MIN_DAMPING_RATIO:g} * 2 * sqrt(stiffness) (damping ratio {MIN_DAMPING_RATIO:g}), or the arm "
                f"oscillates about its target; got damping {self.damping} for stiffness {self.stiffness}, "
                f"damping >= {shown} would be accepted"
            )
        return self


class SimTaskConfig(Strict):
    """The simulated FR3 peg-insertion cell (design §8)."""

    clearance_m: float = Field(0.001, gt=0, le=0.01, description="Gap between peg and hole on each side.")
    peg_half_width_m: float = Field(0.01, gt=0.002, le=0.03, description="Half the width of the square peg.")
    peg_length_m: float = Field(0.05, gt=0.01, le=0.15, description="Length of the peg below the hand.")
    hole_depth_m: float = Field(0.025, gt=0.005, le=0.1, description="Depth of the hole in the board.")
    success_depth_m: float = Field(0.02, gt=0, description="Insertion depth at which the peg counts as inserted.")
    reference_height_m: float = Field(
        0.05, gt=0.0, le=0.2, description="Height of the peg tip above the board at the reference pose."
    )
    reset_xyz_range_m: float = Field(0.045, ge=0, le=0.1, description="Reset pose sampled within ± this (xyz).")
    reset_rpy_range_rad: float = Field(0.07875, ge=0, le=0.3, description="Reset pose sampled within ± this (rpy).")
    reset_deltas: int = Field(
        1,
        ge=1,
        le=10,
        description="The reset offset is the sum of this many random deltas, each within ± range / reset_deltas "
        "(1: uniform within ± range; 3: the paper's reset, three random delta actions of Table V).",
    )
    max_episode_steps: int = Field(200, ge=1, le=10_000, description="Step limit; reaching it truncates.")
    control_period_s: float = Field(0.1, gt=0, le=1.0, description="Policy period (10 Hz).")
    physics_dt_s: float = Field(
        0.002,
        ge=1e-4,
        le=0.005,
        description="MuJoCo physics step, at least 1e-4 s: each control step runs control_period_s / physics_dt_s "
        "physics steps, and a far smaller step makes every command that steps the sim effectively hang.",
    )
    joint_friction_scale: float = Field(
        0.1,
        ge=0,
        le=1.0,
        description="Scale of the model's joint friction loss (a real FR3 compensates most of it).",
    )

    @model_validator(mode="after")
    def _depths(self) -> SimTaskConfig:
        if self.success_depth_m > self.hole_depth_m:
            raise ValueError(f"success_depth_m {self.success_depth_m} exceeds hole_depth_m {self.hole_depth_m}")
        if self.hole_depth_m >= self.peg_length_m:
            raise ValueError("hole_depth_m must be shorter than peg_length_m")
        if self.physics_dt_s * 2 > self.control_period_s:
            raise ValueError("control_period_s must span at least two physics steps")
        return self


class CropConfig(Strict):
    """A rectangle of the raw frame, in pixels (x right, y down), cut out before resizing."""

    x: int = Field(184, ge=0, description="Left edge in pixels.")
    y: int = Field(0, ge=0, description="Top edge in pixels.")
    width: int = Field(480, ge=1, description="Width in pixels.")
    height: int = Field(480, ge=1, description="Height in pixels.")


class CameraConfig(Strict):
    """One camera: a RealSense by serial (or a recording the SDK made), cropped then resized."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_]+$", description="Observation key, e.g. front.")
    serial: str | None = Field(None, description="RealSense serial number; None with a recording or in sim.")
    recording: str | None = Field(None, description="Read this SDK recording (.db3) instead of a live camera.")
    record_to: str | None = Field(None, description="Also record the raw stream with the SDK's recorder here.")
    width: int = Field(848, ge=16, le=4096, description="Raw frame width in pixels.")
    height: int = Field(480, ge=16, le=4096, description="Raw frame height in pixels.")
    fps: int = Field(30, ge=1, le=300, description="Raw frame rate.")
    crop: CropConfig = Field(default_factory=CropConfig, description="Crop box inside the raw frame.")
    out_size: int = Field(84, ge=8, le=512, description="Side of the square image the policy sees.")
    freshness_s: float = Field(0.2, gt=0, le=5.0, description="read() refuses a frame older than this.")

    @model_validator(mode="after")
    def _crop_inside(self) -> CameraConfig:
        c = self.crop
        if c.x + c.width > self.width or c.y + c.height > self.height:
            raise ValueError(
                f"crop x={c.x} y={c.y} width={c.width} height={c.height} leaves the {self.width}x{self.height} frame"
            )
        if self.serial is not None and self.recording is not None:
            raise ValueError("give either serial or recording, not both")
        return self


class OperatorKeysConfig(Strict):
    """Keys the operator presses in the actor's terminal (single printable characters, all different)."""

    success: str = Field("s", min_length=1, max_length=1, description="Mark the episode a success (ends it).")
    failure: str = Field("f", min_length=1, max_length=1, description="Mark a failure and reset.")
    pause: str = Field("p", min_length=1, max_length=1, description="Pause / resume the robot.")
    quit: str = Field("q", min_length=1, max_length=1, description="Quit (asks once more).")

    @model_validator(mode="after")
    def _distinct(self) -> OperatorKeysConfig:
        keys = [self.success, self.failure, self.pause, self.quit]
        if len(set(keys)) != len(keys):
            raise ValueError(f"operator keys must all differ, got {keys}")
        if any(not k.isprintable() or k.isspace() for k in keys):
            raise ValueError(f"operator keys must be printable, non-space characters, got {keys}")
        return self


class OperatorConfig(Strict):
    """Who says success and reset: a person at the keyboard, the sim's success detector, or a log."""

    kind: Literal["keys", "scripted", "replay"] = Field("scripted", description="keys | scripted | replay.")
    keys: OperatorKeysConfig = Field(default_factory=OperatorKeysConfig, description="Key bindings.")


class FrankaConfig(Strict):
    """The real arm through franky (franky-control), or franky's client against a franky-sim server."""

    host: str = Field("172.16.0.2", min_length=1, description="Robot (or franky-sim server) address.")
    realtime: bool = Field(False, description="Require a real-time kernel (franky RealtimeConfig.Enforce).")
    gripper: bool = Field(False, description="Use franky's Gripper (disabled for peg insertion).")
    reconnect_attempts: int = Field(
        8,
        ge=0,
        le=100,
        description="Client rebuilds tried after a lost connection, waiting 0.5, 1, 2, 4, then 5 s between them "
        "(8: about 22 s, for a network blip or a controller that comes back).",
    )
    connect_timeout_s: float = Field(
        10.0,
        ge=0,
        description="A robot (not a loopback franky-sim server) must answer a connection within this long; 0: wait "
        "as long as franky does (no timeout).",
    )
    reset_speed: float = Field(0.2, gt=0, le=1.0, description="Relative speed of move_to resets.")
    sim_server: bool = Field(
        False, description="Start a franky-sim server with the peg scene in its own process (franky-sim twin)."
    )


class EnvConfig(Strict):
    """The environment the actor acts in: the robot (sim twin for now), its action mapping and safety box."""

    robot: Literal["sim", "franky"] = Field(
        "sim", description="sim: the in-process MuJoCo twin; franky: franky's client (real arm or franky-sim server)."
    )
    franka: FrankaConfig = Field(default_factory=FrankaConfig, description="franky connection (robot: franky).")
    task: SimTaskConfig = Field(default_factory=SimTaskConfig, description="The simulated task.")
    action: ActionConfig = Field(default_factory=ActionConfig, description="Action scaling and target limits.")
    safety: SafetyBoxConfig = Field(default_factory=SafetyBoxConfig, description="Safety box of the target.")
    impedance: ImpedanceConfig = Field(default_factory=ImpedanceConfig, description="Impedance gains.")
    cameras: list[CameraConfig] = Field(default_factory=list, description="Cameras (empty: state observations).")
    operator: OperatorConfig = Field(default_factory=OperatorConfig, description="Operator input.")

    @model_validator(mode="after")
    def _camera_names(self) -> EnvConfig:
        """Camera names are observation keys: each its own, none the state's."""
        names = [c.name for c in self.cameras]
        if STATE_OBS_KEY in names:
            raise ValueError(f"camera name {STATE_OBS_KEY!r} collides with the state observation; rename the camera")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"camera names must differ, {duplicates} appear more than once")
        return self

    @model_validator(mode="after")
    def _reset_inside_box(self) -> EnvConfig:
        """Reset offsets are sampled within ± the task's ranges around the reference and clipped to the box
        (hardware/env.py): a range wider than the box would start most resets pinned to a face of it."""
        box = self.safety
        r = self.task.reset_xyz_range_m
        fits = min(min(-lo, hi) for lo, hi in zip(box.xyz_low, box.xyz_high, strict=True))
        for axis, lo, hi in zip("xyz", box.xyz_low, box.xyz_high, strict=True):
            if -r < lo or r > hi:
                raise ValueError(
                    f"task.reset_xyz_range_m ±{r} leaves safety box on axis {axis} [{lo}, {hi}]; "
                    f"at most {fits:g} would be accepted (or widen safety.xyz_low/xyz_high)"
                )
        # The box's orientation limits are degrees around the reference, per axis; the reset range is radians.
        r = self.task.reset_rpy_range_rad
        low, high = [math.radians(v) for v in box.rpy_low_deg], [math.radians(v) for v in box.rpy_high_deg]
        fits = min(min(-lo, hi) for lo, hi in zip(low, high, strict=True))
        for axis, lo, hi, lo_deg, hi_deg in zip(
            ("roll", "pitch", "yaw"), low, high, box.rpy_low_deg, box.rpy_high_deg, strict=True
        ):
            if -r < lo or r > hi:
                raise ValueError(
                    f"task.reset_rpy_range_rad ±{r} leaves safety box on axis {axis} [{lo_deg:g}, {hi_deg:g}] degrees "
                    f"= [{lo:.4g}, {hi:.4g}] rad; at most {math.floor(fits * 1e5) / 1e5:g} would be accepted "
                    "(or widen safety.rpy_low_deg/rpy_high_deg)"
                )
        return self

    @model_validator(mode="after")
    def _cameras_keep_up(self) -> EnvConfig:
        """Every step must see a frame taken since the step before: a camera at least as fast as the control rate,
        and a freshness limit that refuses a frame older than about one step."""
        period = self.task.control_period_s
        for i, cam in enumerate(self.cameras):
            where = f"cameras[{i}] ({cam.name})"
            if cam.fps * period < 1.0 - 1e-9:
                raise ValueError(
                    f"{where}: fps {cam.fps} is below the control rate {1.0 / period:g} Hz "
                    f"(1 / task.control_period_s {period:g} s): steps would see the same frame again; fps >= "
                    f"{math.ceil(1.0 / period - 1e-9)} would be accepted (or a longer task.control_period_s)"
                )
            # A frame is up to one frame interval old when it arrives and up to one control period older when a step
            # reads it; two periods cover both, since 1/fps <= period (checked above).
            frame_s, limit = 1.0 / cam.fps, 2.0 * period
            # A recording is exempt: its frames are replayed, and its last frame may be read after its end.
            if cam.recording is None and cam.freshness_s > limit + 1e-12:
                raise ValueError(
                    f"{where}: freshness_s {cam.freshness_s:g} s would let a step read a frame taken before the "
                    f"previous step (a frame is up to 1/fps = {frame_s:.4g} s old on arrival and one control period "
                    f"older when read), so the policy could act on an outdated image; freshness_s <= {limit:.4g} s "
                    f"= 2 x task.control_period_s ({period:g} s) would be accepted"
                )
        return self


class EncoderConfig(Strict):
    """The small CNN that turns one camera's uint8 image into features (one per camera; unused without cameras).

    Each conv layer is 3x3 with stride 2 and a ReLU; the flattened output goes through Linear -> LayerNorm -> tanh
    (the DrQ/SAC-AE trunk). Random-shift augmentation (DrQ) pads by `shift_pad` pixels and crops back at a random
    offset, per image, whenever the networks learn from images.
    """

    channels: list[int] = Field(default_factory=lambda: [32, 64, 64], description="Conv channels, 3x3 stride 2 each.")
    feature_dim: int = Field(64, ge=1, le=4096, description="Features per camera.")
    shift_pad: int = Field(4, ge=0, le=16, description="DrQ random-shift padding in pixels (0: no augmentation).")

    @model_validator(mode="after")
    def _channels(self) -> EncoderConfig:
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive sizes, got {self.channels}")
        return self

    @property
    def min_image_size(self) -> int:
        """The smallest image side the convs take: each unpadded 3x3 stride-2 conv needs 2 * (its output) + 1."""
        return 2 ** (len(self.channels) + 1) - 1

    def image_problem(self, size: int) -> str | None:
        """Why a size x size image does not suit this encoder, or None."""
        if size < self.min_image_size:
            return (
                f"{size} px is too small for {len(self.channels)} stride-2 convs (channels {self.channels}): at least "
                f"{self.min_image_size} px, or fewer channels"
            )
        if 2 * self.shift_pad >= size:
            return (
                f"a random shift of up to {self.shift_pad} px (shift_pad) moves half or more of a {size} px image out "
                f"of view: shift_pad below {(size + 1) // 2}"
            )
        return None


# --------------------------------------------------------------------------------------------------------------------
# Demonstrations and BC
# --------------------------------------------------------------------------------------------------------------------
class ExpertConfig(Strict):
    """Scripted expert with human-like imperfections, for simulated demonstrations."""

    action_noise: float = Field(0.3, ge=0, le=1.0, description="Std of Gaussian action noise (action units).")
    noise_smoothing: float = Field(
        0.5,
        ge=0,
        lt=1.0,
        description="Correlation of the noise between steps (0 = white, like a hand's tremor).",
    )
    perceived_offset_std_m: float = Field(
        0.0015, ge=0, le=0.01, description="Per-episode std of where the demonstrator thinks the hole is."
    )
    successful_only: bool = Field(True, description="Keep only successful demonstrations, as a lab would.")


class BCConfig(Strict):
    """Behaviour-cloning policy and its training budget."""

    policy: Literal["gaussian", "gmm"] = Field("gmm", description="Gaussian or Gaussian-mixture head.")
    hidden: list[int] = Field(default_factory=lambda: [256, 256], description="MLP hidden sizes.")
    num_modes: int = Field(5, ge=1, le=32, description="Mixture components (gmm only).")
    min_std: float = Field(0.01, gt=0, le=1.0, description="Lower bound on every component's std.")
    steps: int = Field(3000, ge=1, description="Gradient steps of BC training.")
    batch_size: int = Field(256, ge=1, description="Minibatch size.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    demos: int = Field(50, ge=1, description="Demonstrations to collect for the BC policy.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Image encoder (image configs only).")

    @model_validator(mode="after")
    def _hidden(self) -> BCConfig:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        return self


# --------------------------------------------------------------------------------------------------------------------
# Q2RL
# --------------------------------------------------------------------------------------------------------------------
Method = Literal["q2rl", "ibrl", "rlpd", "sac", "no_gating", "no_qinit"]


class QEstimationConfig(Strict):
    """Q-Estimation: BC rollouts, V_BC regression, Q_RL initialisation and actor pre-training (design §5)."""

    rollouts: int = Field(100, ge=1, description="BC episodes rolled out for Q-Estimation.")
    alpha: float = Field(1.0, gt=0, description="Boltzmann temperature of the BC policy in Q^_BC.")
    value_steps: int = Field(5000, ge=1, description="Gradient steps of V_BC regression on Monte-Carlo returns.")
    value_rounds: int = Field(
        2,
        ge=1,
        le=10,
        description="Rounds of refitting V_BC, each bootstrapping truncated returns with the last fit.",
    )
    q_init_steps: int = Field(20_000, ge=0, description="Gradient steps regressing every critic to Q^_BC.")
    q_init_bonus_cap: float | None = Field(
        0.0,
        description="Cap on alpha*(log pi_BC + H) in the Q_RL initialisation targets (None: uncapped, Q^_BC as is). "
        "Near the BC mode the term is positive (about alpha*d/2 for a Gaussian); an RL actor pre-trained to that mode "
        "would bootstrap it every step, lifting Q_RL by up to alpha*d/(2(1-gamma)) and taking over every gating "
        "decision. Capped at 0, Q_RL starts at V_BC for likely actions and below it for unlikely ones.",
    )
    q_init_extra_actions: bool = Field(
        True,
        description="Also regress Q_RL to Q^_BC at BC-sampled and uniformly random actions of each rollout state, so "
        "that Q_RL starts out rating actions the BC policy would not take as low as Q^_BC does.",
    )
    actor_pretrain_steps: int = Field(5000, ge=0, description="Gradient steps pulling the RL actor to BC actions.")
    batch_size: int = Field(256, ge=1, description="Minibatch size for these regressions.")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate for these regressions.")


class AgentConfig(Strict):
    """SAC/REDQ learner with Q-gating (design §5); baselines by `method`."""

    method: Method = Field("q2rl", description="q2rl, or a baseline/ablation from the same code.")
    hidden: list[int] = Field(default_factory=lambda: [512, 512, 512], description="Actor and critic MLP sizes.")
    num_critics: int = Field(10, ge=2, description="Critic ensemble size.")
    critic_subsample: int = Field(2, ge=1, description="Target critics drawn for the min in the TD target.")
    utd: int = Field(4, ge=1, description="Critic updates per actor update (one learner step).")
    actor_q: Literal["mean", "min"] = Field(
        "min",
        description="What the actor ascends: the ensemble minimum (pessimistic) or the ensemble mean (REDQ's; every "
        "online run on the twin with it collapsed, docs/algorithm.md).",
    )
    batch_size: int = Field(256, ge=2, description="Minibatch size.")
    actor_lr: float = Field(3e-4, gt=0, description="Actor learning rate.")
    critic_lr: float = Field(3e-4, gt=0, description="Critic learning rate.")
    temperature_lr: float = Field(3e-4, gt=0, description="Temperature learning rate.")
    init_temperature: float = Field(0.1, gt=0, description="Initial SAC temperature.")
    target_entropy: float | None = Field(None, description="SAC target entropy; None means -action_dim.")
    discount: float = Field(0.99, gt=0, lt=1, description="Discount factor.")
    backup_entropy: bool = Field(
        False,
        description="Add -alpha*log pi to the TD target (soft Q). Off, as in the SAC of WSRL that Q2RL uses: the "
        "entropy bonus would lift Q_RL by alpha*H/(1-gamma) above the frozen Q^_BC and bias every gating decision.",
    )
    tau: float = Field(0.005, gt=0, le=1, description="Soft target update rate.")
    bc_loss_weight: float = Field(0.1, ge=0, le=1, description="w in (1-w)*SAC actor loss + w*BC loss.")
    normalize_actor_q: bool = Field(
        True,
        description="Divide the SAC actor term by the batch's mean |Q| (as TD3+BC does) so that the BC weight means "
        "the same at any reward scale; without it, Q of magnitude ~50 drowns a BC loss of ~1.",
    )
    reward_scale: float = Field(10.0, gt=0, description="r~ = scale*r + bias (robot: 10).")
    reward_bias: float = Field(-1.0, description="r~ = scale*r + bias (robot: -1).")
    rl_action: Literal["mode", "sample"] = Field("mode", description="RL proposal: policy mode or a sample.")
    bc_action: Literal["mode", "sample"] = Field("sample", description="BC proposal: policy mode or a sample.")
    offline_ratio: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="Share of each batch drawn from demonstrations; None: 0.5 for rlpd, else 0.",
    )
    layer_norm: bool = Field(True, description="LayerNorm in critics.")
    encoder: EncoderConfig = Field(
        default_factory=EncoderConfig,
        description="Image encoder of the critics (trained by the critic loss, used detached by the actor) and, "
        "separately, of V_BC (image configs only).",
    )
    clip_values: bool = Field(
        True,
        description="Clamp TD targets and Q^_BC to the feasible return range: [min(0, r~_min)/(1-gamma), "
        "max(0, r~_max)], valid because the only positive reward (success) terminates the episode.",
    )

    @model_validator(mode="after")
    def _sizes(self) -> AgentConfig:
        if self.critic_subsample > self.num_critics:
            raise ValueError(f"critic_subsample {self.critic_subsample} exceeds num_critics {self.num_critics}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive sizes, got {self.hidden}")
        return self

    # What each method switches on; one place, read by the training loop.
    @property
    def uses_q_estimation(self) -> bool:
        return self.method in ("q2rl", "no_gating", "no_qinit")

    @property
    def q_init(self) -> bool:
        return self.method in ("q2rl", "no_gating")

    @property
    def gating(self) -> Literal["q2rl", "shared", "none"]:
        """q2rl: frozen Q^_BC scores a_BC, min Q_RL scores a_RL; shared: Q_RL scores both; none: RL only."""
        if self.method in ("q2rl", "no_qinit"):
            return "q2rl"
        if self.method in ("ibrl", "no_gating"):
            return "shared"
        return "none"

    @property
    def effective_bc_loss_weight(self) -> float:
        return self.bc_loss_weight if self.method in ("q2rl", "no_gating", "no_qinit") else 0.0

    @property
    def value_range(self) -> tuple[float, float]:
        """Feasible range of discounted returns of r~ = scale*r + bias when success (r = 1) terminates. A return is
        bias for each step before success plus, at step k, success's reward: bias/(1-gamma) + gamma^k (scale + bias -
        bias/(1-gamma)), between its values at k = 0 (succeeding now) and k -> inf (never succeeding); 0 included."""
        success = self.reward_scale + self.reward_bias
        never = self.reward_bias / (1.0 - self.discount)
        return min(0.0, success, never), max(0.0, success, never)

    @property
    def effective_offline_ratio(self) -> float:
        if self.offline_ratio is not None:
            return self.offline_ratio
        return 0.5 if self.method == "rlpd" else 0.0


# torch.compile modes that make CUDA graphs of their own on a GPU (torch.compile's documentation says so of both).
CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")


class TrainConfig(Strict):
    """The single-process loop of `robot-rl train`."""

    env_steps: int = Field(
        20_000,
        ge=1,
        description="Online environment steps after Q-Estimation. With actors and a learner, each actor starts no "
        "episode once the budget is reached, counting what the learner stored and what it has itself sent: actors "
        "running together can end up to one episode each past it.",
    )
    learner_steps_per_env_step: float = Field(
        1.0, gt=0, le=16, description="Learner steps (UTD critic + 1 actor update) per environment step."
    )
    learning_starts: int = Field(
        256,
        ge=0,
        description="Online transitions stored before the first learner step (methods without Q-init).",
    )
    eval_every: int = Field(2000, ge=1, description="Evaluate every this many environment steps.")
    eval_episodes: int = Field(20, ge=1, description="Episodes per evaluation.")
    checkpoint_every: int = Field(5000, ge=1, description="Checkpoint every this many environment steps.")
    keep_checkpoints: int = Field(
        5, ge=1, description="Periodic step_* checkpoints kept, the newest (latest and final are always kept)."
    )
    buffer_capacity: int = Field(2_000_000, ge=1000, description="Replay buffer capacity (transitions).")
    device: Literal["auto", "cpu", "cuda"] = Field("cpu", description="Torch device; auto picks CUDA if present.")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off",
        description="torch.compile the tensor work of the learner's critic and actor updates with this mode "
        "(reduce-overhead and max-autotune: also CUDA graphs on a GPU). The first steps compile (tens of seconds; the "
        "learner serves no actor meanwhile). Gains: docs/benchmarks.md.",
    )
    cuda_graph: bool = Field(
        False,
        description="On a CUDA learner, capture one whole learner step (the utd critic updates, the actor and "
        "temperature update, their backward passes and optimiser steps) in one CUDA graph after a few eager steps, "
        "and replay it every step: one launch per step. With train.compile=default the compiled kernels are "
        "captured; reduce-overhead and max-autotune (torch's own CUDA graphs) cannot be combined with it. A CPU "
        "learner ignores it.",
    )
    bf16: bool = Field(
        False,
        description="bf16 autocast of the learner's forward passes (weights, optimiser and losses stay float32); "
        "for GPUs and CPUs with bf16 units, and large networks: on a CPU it about doubles the image config's steps/s "
        "but slows small networks (the casts cost more than they save). Gains: docs/benchmarks.md.",
    )
    prefetch: bool = Field(
        False,
        description="Sample each learner step's minibatches on a background thread (pinned memory on CUDA); for a "
        "replay buffer in host memory only (replay_on_gpu samples on the GPU).",
    )
    replay_on_gpu: bool = Field(
        True,
        description="On a CUDA learner, keep a copy of the replay buffer (and of the demonstrations' buffer) in GPU "
        "memory and gather each minibatch there: only indices cross from the host. Needs the buffer's size in free "
        "GPU memory (refused at start otherwise). A CPU learner ignores it.",
    )
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads; 0 leaves torch's default.")

    @model_validator(mode="after")
    def _one_kind_of_cuda_graph(self) -> TrainConfig:
        if self.cuda_graph and self.compile in CUDA_GRAPH_COMPILE_MODES:
            raise ValueError(
                "train.cuda_graph captures the whole learner step in a CUDA graph itself; torch.compile's "
                f"{self.compile} mode makes CUDA graphs of its own inside it: use train.compile=default (or off) with "
                "train.cuda_graph, or train.cuda_graph=false"
            )
        return self


class ActorConfig(Strict):
    """The actor service (`robot-rl actor`): its control loop next to the robot."""

    actor_id: str = Field("actor0", pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="This actor's id at the learner.")
    period_s: float = Field(
        0.1, ge=0, le=10, description="Control period (10 Hz on the robot); the sim twin may run faster, 0 = unpaced."
    )
    chunk_steps: int = Field(30, ge=1, le=10_000, description="Transitions per chunk sent (and at episode end).")
    max_unacked: int = Field(
        200_000, ge=100, description="Transitions kept unacknowledged (on disk) before the actor pauses its episodes."
    )
    weights_staleness_s: float = Field(
        60.0, gt=0, description="Seconds without word from the learner before the actor falls back to BC only."
    )
    max_env_steps_ahead: int | None = Field(
        None,
        ge=1,
        description="Online env steps the actor may run ahead of learner_steps / train.learner_steps_per_env_step "
        "(sim: keeps a fast actor from racing a slow learner; None: no cap, as on a robot).",
    )
    stop_wait_s: float = Field(10.0, ge=0, description="On stop: seconds to wait for the last acknowledgements.")
    max_faults_in_a_row: int = Field(
        5,
        ge=1,
        description="Episodes in a row that may fail on a robot or camera fault before the actor stops (it waits "
        "0.5 s, doubling, between them).",
    )
    min_free_disk_mb: float = Field(
        256.0,
        ge=0,
        description="Free space the actor's --out disk must keep: below it the actor ends the episode (logged as "
        "interrupted) and stops before a write fails; `train` and `collect` check it before each episode too. 0 turns "
        "the check off.",
    )
    gating_precision: Literal["float32", "int8"] = Field(
        "float32",
        description="Networks the actor gates with: float32 as trained, or int8 (compact copies: int8 weight-only "
        "linear layers, bf16 convolutions; Q-values within ~1%, image-config gating ~1.5x faster on CPU: "
        "docs/benchmarks.md). Made from each weights broadcast off the control thread.",
    )
    gating_threads: Literal[1, 2] = Field(
        1,
        description="2: the BC branch of each gating decision (BC encoder, sample, V_BC) runs on a second thread "
        "beside the RL branch; same decisions.",
    )
    weights_min_interval_s: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Prepare at most one weights broadcast per this many seconds (always the newest; a broadcast of "
        "a new phase at once). Caps the actor's CPU spent on weights: an image-config broadcast takes ~0.2 s of one "
        "core to prepare at int8, and a fast learner may broadcast several times a second. 0: every broadcast.",
    )
    log_episodes: bool = Field(True, description="Write every episode to DIR/episodes/ (HDF5, robomimic layout).")


ENDPOINT_FORMS = "tcp://HOST:PORT (PORT 1-65535), ipc://PATH or inproc://NAME"
_TCP_ENDPOINT = re.compile(r"tcp://([^\s:]+):([0-9]+)")
_OTHER_ENDPOINT = re.compile(r"(ipc|inproc)://\S+")


def check_endpoint(value: str) -> str:
    """Return a ZeroMQ endpoint unchanged if it is tcp://HOST:PORT with 1 <= PORT <= 65535, ipc://PATH or
    inproc://NAME; ValueError saying which forms are allowed otherwise."""
    tcp = _TCP_ENDPOINT.fullmatch(value)
    if tcp is not None:
        port = int(tcp.group(2))
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range; ports are 1-65535")
        return value
    if _OTHER_ENDPOINT.fullmatch(value) is None:
        raise ValueError(f"not a ZeroMQ endpoint; expected {ENDPOINT_FORMS}")
    return value


class TransportConfig(Strict):
    """ZeroMQ endpoints and limits shared by actor and learner (design §6)."""

    learner: str = Field(
        "tcp://127.0.0.1:5555",
        description="The learner's request (ROUTER) endpoint: bound by the learner, connected by actors.",
    )
    weights: str | None = Field(
        None,
        description="The learner's PUB endpoint for weights and status; None: the request port + 1.",
    )
    max_message_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="ZMQ_MAXMSGSIZE: larger messages are dropped by the socket."
    )
    poll_ms: int = Field(50, ge=1, le=10_000, description="Receive timeout of every poll (the stop event is checked).")
    status_every_s: float = Field(0.5, gt=0, description="Learner status broadcast period.")
    keys_dir: str | None = Field(None, description="CURVE keys from `robot-rl keys`; None: no encryption (loopback).")

    @field_validator("learner", "weights")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint(value)

    @model_validator(mode="after")
    def _weights_port(self) -> TransportConfig:
        if self.weights is None and self.learner.startswith("tcp://") and int(self.learner.rsplit(":", 1)[1]) == 65535:
            raise ValueError(
                "transport.learner uses port 65535, which leaves no port + 1 for the weights endpoint; "
                "choose a lower port or set transport.weights"
            )
        return self

    @property
    def weights_endpoint(self) -> str:
        """The PUB endpoint (explicit, or the request endpoint's port + 1)."""
        if self.weights is not None:
            return self.weights
        if not self.learner.startswith("tcp://"):
            return self.learner + ".weights"
        host, port = self.learner.rsplit(":", 1)
        return f"{host}:{int(port) + 1}"


# The largest run seed: torch.manual_seed and HDF5's integer attributes take 64 bits, and the seeds derived from the
# run's are it times small constants.
MAX_SEED = 2**31 - 1


class RunConfig(Strict):
    """The whole tree: one per run, saved resolved as config.yaml in the run directory."""

    seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description=f"Seed for environment, networks and sampling, 0 to {MAX_SEED}: seeds derived from it (it times "
        "small constants) are stored as 64-bit integers.",
    )
    env: EnvConfig = Field(default_factory=EnvConfig, description="Environment and robot.")
    expert: ExpertConfig = Field(default_factory=ExpertConfig, description="Scripted demonstrator (sim).")
    bc: BCConfig = Field(default_factory=BCConfig, description="Behaviour cloning.")
    qest: QEstimationConfig = Field(default_factory=QEstimationConfig, description="Q-Estimation.")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="RL agent and method.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    actor: ActorConfig = Field(default_factory=ActorConfig, description="Actor service.")
    transport: TransportConfig = Field(default_factory=TransportConfig, description="Actor-learner transport.")

    @model_validator(mode="after")
    def _images_suit_the_encoders(self) -> RunConfig:
        problems = [
            f"env.cameras {camera.name}: out_size {camera.out_size} for {where}.encoder: {problem}"
            for camera in self.env.cameras
            for where, encoder in (("bc", self.bc.encoder), ("agent", self.agent.encoder))
            if (problem := encoder.image_problem(camera.out_size))
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------------------------------
def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        message = e["msg"].removeprefix("Value error, ")  # pydantic's prefix of a validator's own message
        lines.append(f"  {path}: {message}{shown}")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that names one key twice (YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _OverrideLoader(_UniqueKeyLoader):
    """The loader of --set values: _UniqueKeyLoader that also reads a number in exponent form without a '.' or without
    the exponent's sign (1e9, 2.5e6, -3E-2), which YAML 1.1 leaves a string, as a float; quoted, it stays a string."""


_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into (['a','b','c'], value parsed as YAML; 1e9 and the like as floats)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form path.to.field=value")
    path, raw = text.split("=", 1)
    keys = [k.strip() for k in path.strip().split(".")]
    if not keys or any(not k for k in keys):
        raise ConfigError(f"override {text!r} has an empty field name")
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return keys, value


def _merge(into: dict[str, Any], value: dict[str, Any]) -> None:
    """Write the entries of `value` into `into`, a mapping into a mapping entry recursively (other entries kept)."""
    for key, item in value.items():
        child = into.get(key)
        if isinstance(child, BaseModel):
            child = child.model_dump()
        if isinstance(item, dict) and isinstance(child, dict):
            child = dict(child)
            _merge(child, item)
            into[key] = child
        else:
            into[key] = item


def apply_override(tree: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set tree[k0][k1]...= value, refusing a path that names no field of RunConfig. A mapping set on a section is
    merged into it (`agent={num_critics: 4}` changes num_critics, the section's other fields stay); any other value
    replaces the field."""
    model: type[BaseModel] | None = RunConfig
    node = tree
    for depth, key in enumerate(keys):
        path = ".".join(keys[: depth + 1])
        if model is None or key not in model.model_fields:
            raise ConfigError(f"--set {'.'.join(keys)}: no field {path!r}")
        annotation = model.model_fields[key].annotation
        is_last = depth == len(keys) - 1
        if is_last:
            _merge(node, {key: value})
            return
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        child = node.get(key)
        if isinstance(child, list) or _is_list_field(annotation):
            example = " (e.g. [{name: front, out_size: 64}, {name: wrist, out_size: 64}])" if key == "cameras" else ""
            raise ConfigError(
                f"--set {'.'.join(keys)}: {path!r} is a list, set as a whole: --set '{path}=[...]' with every item in "
                f"YAML flow style{example}; a config file shows its items"
            )
        if child is None:
            child = {}
        elif isinstance(child, BaseModel):
            child = child.model_dump()
        elif not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {path!r} is not a section")
        node[key] = child
        node = child


def _is_list_field(annotation: Any) -> bool:
    """Whether a field's annotation is a list type (list[...], possibly optional)."""
    origin = typing.get_origin(annotation)
    if origin is list:
        return True
    return origin in (typing.Union, types.UnionType) and any(_is_list_field(a) for a in typing.get_args(annotation))


def _read_config_file(p: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file; ConfigError naming the file when it cannot be one."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory, not a YAML file; pass a .yaml file to --config")
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {p} is not a text file (byte {exc.start} is not UTF-8); is it a data file? "
            "pass a YAML config (e.g. configs/sim_peg_state.yaml) to --config"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from exc
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if loaded is None:
        raise ConfigError(
            f"config file {p} holds no settings (it is empty or only comments); leave out --config to run on the "
            "embedded defaults"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def _set_by(keys: list[str], value: Any, loc: tuple[int | str, ...]) -> Literal["yes", "part", "no"]:
    """Whether the override `keys`=`value` set the field at pydantic's error location `loc`: "yes" (it gave that
    field its value), "part" (it set something inside the section the error is about, which other sources filled
    too), "no"."""
    if len(loc) < len(keys):
        return "part" if [str(p) for p in loc] == keys[: len(loc)] else "no"
    if [str(p) for p in loc[: len(keys)]] != keys:
        return "no"
    node, whole = value, False  # whole: inside a list, which an override replaces as a whole
    for part in loc[len(keys) :]:
        if isinstance(node, dict) and not whole:
            if part not in node:
                return "no"  # a field of a merged section the override did not name
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node, whole = node[part], True
        else:
            return "yes"  # the value replaced the field; pydantic's location goes on into its type
    return "part" if isinstance(node, dict) and not whole else "yes"


def _error_source(
    err: ValidationError, overrides: list[tuple[str, list[str], Any]], source: str, *, explicit: bool
) -> str:
    """Where the invalid values of `err` came from: the --set (or flag) that set every failing field, else `source`
    when no override touched them, else `source` with --set overrides (`source` alone when the caller named it
    (`explicit`): its words say which overrides it holds)."""
    labels: list[str] = []
    for e in err.errors():
        found = [(label, _set_by(keys, value, tuple(e["loc"]))) for label, keys, value in overrides]
        setters = [label for label, how in found if how == "yes"]
        if setters:
            labels.append(setters[-1])  # the last override of a field wins
        elif any(how == "part" for _, how in found):
            labels.append("")  # cannot tell: the section's values come from several sources
        else:
            labels.append(source)
    if all(labels) and all(label != source for label in labels):
        return ", ".join(dict.fromkeys(labels))
    if all(label == source for label in labels) or not overrides or explicit:
        return source
    return f"{source} with --set overrides"


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: RunConfig | None = None,
    source: str | None = None,
    flags: dict[str, str] | None = None,
) -> RunConfig:
    """Read a YAML config (or `base`, or the embedded defaults when path is None), apply overrides, validate.
    `source` names where the config came from in error messages (default: the file, or "embedded defaults"); an
    invalid value an override set is named by that override instead: `--set TEXT`, or `flags[TEXT]` for an override
    a command-line flag made (e.g. {"seed=5": "--seed 5"})."""
    tree: dict[str, Any] = {} if base is None else base.model_dump(mode="json")
    if path is not None:
        tree = _read_config_file(Path(path))
    explicit = source is not None
    source = source or (str(path) if path is not None else "embedded defaults")
    applied: list[tuple[str, list[str], Any]] = []
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
        applied.append(((flags or {}).get(text, f"--set {text}"), keys, value))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        where = _error_source(err, applied, source, explicit=explicit)
        raise ConfigError(_format_validation_error(err, where)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (tuples written as lists), loadable by load_config."""
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def config_hash(cfg: BaseModel) -> str:
    """A stable short hash of a config section (for checkpoints and, later, the actor/learner handshake)."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]
