"""The config tree: YAML files, --set overrides, and refusals that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from robot_rl.config import ConfigError, RunConfig, SimTaskConfig, dump_config, load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_overrides_reach_nested_fields_and_parse_yaml_values():
    cfg = load_config(None, ["agent.method=ibrl", "env.task.clearance_m=0.002", "agent.hidden=[64, 32]", "seed=5"])
    assert cfg.agent.method == "ibrl"
    assert cfg.env.task.clearance_m == 0.002
    assert cfg.agent.hidden == [64, 32]
    assert cfg.seed == 5


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  utd: 2\n")
    assert load_config(path).agent.utd == 2
    assert load_config(path, ["agent.utd=8"]).agent.utd == 8


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("agent.metod=sac", "agent.metod"),
        ("agent.method=dqn", "agent.method"),
        ("env.safety.xyz_low=[0.1, 0.0, 0.0]", "env.safety"),
        ("env.safety.rpy_low_deg=[5, -5, -20]", "env.safety"),
        ("agent.num_critics=1", "agent.num_critics"),
        ("agent.critic_subsample=20", "agent"),
        ("env.task.max_episode_steps=abc", "env.task.max_episode_steps"),
        ("env.task.success_depth_m=0.5", "env.task"),
        ("env.impedance.stiffness=[1, 1, 1, 1, 1, -1]", "env.impedance"),
        ("train.eval_every=0", "train.eval_every"),
        ("novalue", "path.to.field=value"),
        (
            "agent.hidden.x=1",
            "--set agent.hidden.x: 'agent.hidden' is a list, set as a whole: --set 'agent.hidden=[...]'",
        ),
        ("env.cameras.0.out_size=64", "'env.cameras' is a list, set as a whole: --set 'env.cameras=[...]'"),
        # What reaches a real arm has a ceiling: a 5 m box (0.5 for 0.05 is a typo away) or a rigid arm is refused.
        ("env.safety.xyz_high=[0.05, 0.05, 5.0]", "xyz limits reach beyond ±0.3 m of the reference on axis z"),
        ("env.safety.rpy_low_deg=[-5, -90, -20]", "rpy_deg limits reach beyond ±60 degrees"),
        ("env.impedance.stiffness=[1e9, 1024, 1024, 100, 100, 100]", "stiffness above what is sent to an arm (x 1e+09"),
        ("env.impedance.damping=[64, 64, 64, 10, 10, 500]", "damping above what is sent to an arm (yaw 500 > 50)"),
        # Damping far below the stiffness (ratio < MIN_DAMPING_RATIO) leaves the arm oscillating about its target.
        (
            "env.impedance.damping=[1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6]",
            "damping too low for the stiffness (x 1e-06 < 16",
        ),
        # A reset range wider than the box's orientation limits starts resets pinned to the box (5 degrees = 0.0873).
        ("env.task.reset_rpy_range_rad=0.2", "task.reset_rpy_range_rad ±0.2 leaves safety box on axis roll"),
        # A camera slower than the control rate, or one whose frames may be older than about one step.
        ("env.cameras=[{name: front, fps: 6}]", "cameras[0] (front): fps 6 is below the control rate 10 Hz"),
        ("env.cameras=[{name: front, freshness_s: 0.5}]", "freshness_s <= 0.2 s = 2 x task.control_period_s"),
        # NaN and infinities are refused in every field, bounded or not.
        ("agent.reward_bias=.nan", "agent.reward_bias: Input should be a finite number"),
        ("agent.critic_lr=.inf", "agent.critic_lr: Input should be a finite number"),
        ("agent.target_entropy=-.inf", "agent.target_entropy: Input should be a finite number"),
        ("seed={a: 1, a: 2}", "key 'a' appears twice"),
    ],
)
def test_bad_values_are_refused_with_the_field_path(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_is_refused_with_its_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("env:\n  task:\n    clearence_m: 0.001\n")
    with pytest.raises(ConfigError, match=r"env\.task\.clearence_m"):
        load_config(path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "agent: [1, 2\n"])
def test_malformed_file_is_refused_with_its_name(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(path)


def test_a_key_given_twice_in_a_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("seed: 0\nagent:\n  utd: 2\n  utd: 20\n")  # YAML itself would keep the last silently
    with pytest.raises(ConfigError, match=r"(?s)twice\.yaml.*key 'utd' appears twice.*line 4"):
        load_config(path)
    path.write_text("agent:\n  hidden: [64, 64]\nbc:\n  hidden: [32, 32]\n")
    cfg = load_config(path)  # the same key in two sections is not a repeat
    assert (cfg.agent.hidden, cfg.bc.hidden) == ([64, 64], [32, 32])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config("nope.yaml")


def test_dump_round_trips():
    cfg = load_config(None, ["agent.method=rlpd", "seed=3"])
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def _walk(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, f"{prefix}{name}.")


def test_every_field_has_a_description_and_every_model_forbids_extra():
    for path, field in _walk(RunConfig):
        assert field.description, f"{path} has no description"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            assert ann.model_config.get("extra") == "forbid", path


def test_method_switches():
    assert load_config(None, ["agent.method=q2rl"]).agent.gating == "q2rl"
    assert load_config(None, ["agent.method=no_gating"]).agent.gating == "shared"
    assert not load_config(None, ["agent.method=no_qinit"]).agent.q_init
    assert load_config(None, ["agent.method=rlpd"]).agent.effective_offline_ratio == 0.5
    assert load_config(None, ["agent.method=sac"]).agent.effective_bc_loss_weight == 0.0


def test_damping_must_reach_a_quarter_of_critical_for_the_stiffness():
    stiff = "env.impedance.stiffness=[3000, 3000, 3000, 300, 300, 300]"
    with pytest.raises(ConfigError) as err:
        load_config(None, [stiff, "env.impedance.damping=[0.01, 0.01, 0.01, 0.01, 0.01, 0.01]"])
    message = str(err.value)
    assert "env.impedance: damping too low for the stiffness (x 0.01 < 27.387" in message
    assert "0.25 * 2 * sqrt(stiffness)" in message
    assert "damping >= [27.387, 27.387, 27.387, 8.661, 8.661, 8.661] would be accepted" in message
    # The values the message offers pass, and so do the defaults (ratios 1.0 and 0.5) and the floor itself.
    accepted = load_config(None, [stiff, "env.impedance.damping=[27.387, 27.387, 27.387, 8.661, 8.661, 8.661]"])
    assert accepted.env.impedance.damping[0] == 27.387
    assert load_config(None).env.impedance.damping == (64.0, 64.0, 64.0, 10.0, 10.0, 10.0)
    assert load_config(None, ["env.impedance.damping=[16, 16, 16, 5, 5, 5]"]).env.impedance.damping[3] == 5.0
    with pytest.raises(ConfigError, match=r"\(yaw 4\.99 < 5\)"):
        load_config(None, ["env.impedance.damping=[16, 16, 16, 5, 5, 4.99]"])


def test_reset_orientation_range_must_fit_the_box_per_axis():
    # The box's roll/pitch/yaw limits are degrees around the reference; the reset range is radians on every axis.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["env.safety.rpy_low_deg=[-5, -2, -20]"])  # the default range 0.07875 > 2 degrees
    assert (
        "task.reset_rpy_range_rad ±0.07875 leaves safety box on axis pitch [-2, 5] degrees = [-0.03491, 0.08727] rad; "
        "at most 0.0349 would be accepted"
    ) in str(err.value)
    cfg = load_config(None, ["env.safety.rpy_low_deg=[-5, -2, -20]", "env.task.reset_rpy_range_rad=0.0349"])
    assert cfg.env.task.reset_rpy_range_rad == 0.0349
    with pytest.raises(ConfigError, match=r"at most 0\.08726 would be accepted"):
        load_config(None, ["env.task.reset_rpy_range_rad=0.0873"])  # just past the ±5 degrees of roll and pitch
    assert load_config(None, ["env.task.reset_rpy_range_rad=0.08726"]).env.task.reset_rpy_range_rad == 0.08726
    with pytest.raises(ConfigError, match=r"reset_xyz_range_m ±0.06 leaves safety box on axis x .*at most 0.05 would"):
        load_config(None, ["env.task.reset_xyz_range_m=0.06"])


def test_cameras_must_keep_up_with_the_control_rate():
    with pytest.raises(ConfigError) as err:
        cameras = "env.cameras=[{name: front, freshness_s: 0.1}, {name: wrist, fps: 15, freshness_s: 0.1}]"
        load_config(None, ["env.task.control_period_s=0.05", cameras])
    assert "cameras[1] (wrist): fps 15 is below the control rate 20 Hz" in str(err.value)
    assert "fps >= 20 would be accepted" in str(err.value)
    assert load_config(None, ["env.cameras=[{name: front, fps: 10}]"]).env.cameras[0].fps == 10  # exactly the rate
    with pytest.raises(ConfigError) as err:
        load_config(None, ["env.cameras=[{name: front, serial: '123', freshness_s: 0.25}]"])
    assert (
        "cameras[0] (front): freshness_s 0.25 s would let a step read a frame taken before the previous step"
    ) in str(err.value)
    assert "freshness_s <= 0.2 s = 2 x task.control_period_s (0.1 s) would be accepted" in str(err.value)
    assert load_config(None, ["env.cameras=[{name: front, freshness_s: 0.2}]"]).env.cameras[0].freshness_s == 0.2
    slow = load_config(None, ["env.task.control_period_s=0.5", "env.cameras=[{name: front, freshness_s: 1.0}]"])
    assert slow.env.cameras[0].freshness_s == 1.0
    # A recording is replayed: reading its last frame after its end is no stale view of the arm's world.
    recording = load_config(None, ["env.cameras=[{name: front, recording: front.db3, freshness_s: 5}]"])
    assert recording.env.cameras[0].freshness_s == 5


def test_a_seed_beyond_31_bits_is_refused_naming_the_field():
    """Seeds are multiplied by small constants and stored as 64-bit integers: a larger one fails deep in a run."""
    assert load_config(None, [f"seed={2**31 - 1}"]).seed == 2**31 - 1
    with pytest.raises(ConfigError) as err:
        load_config(None, ["seed=99999999999999999999"])
    assert "seed: Input should be less than or equal to 2147483647 (got 99999999999999999999)" in str(err.value)
    with pytest.raises(ConfigError, match=r"seed: Input should be less than or equal to 2147483647"):
        load_config(None, [f"seed={2**31}"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("seed=true", "seed"),
        ("agent.actor_lr=false", "agent.actor_lr"),
        ("env.safety.xyz_low=[true, -0.1, -0.1]", "env.safety.xyz_low"),
    ],
)
def test_true_or_false_for_a_number_is_refused(override, field):
    """pydantic would read true as 1 and false as 0: a run with seed 1 or a learning rate of 0 from a typo."""
    with pytest.raises(ConfigError, match=rf"{field}: true/false where a number is expected"):
        load_config(None, [override])
    # A switch still takes true/false, and a number still takes a number.
    config = load_config(None, ["agent.layer_norm=false", "seed=3"])
    assert config.agent.layer_norm is False and config.seed == 3


def test_a_mapping_set_on_a_section_merges_into_the_files_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("agent:\n  utd: 3\n  hidden: [32, 32]\nenv:\n  task:\n    clearance_m: 0.002\n")
    cfg = load_config(path, ["agent={num_critics: 4}", "env={task: {peg_length_m: 0.06}}"])
    assert (cfg.agent.num_critics, cfg.agent.utd, cfg.agent.hidden) == (4, 3, [32, 32])  # the file's others stay
    assert (cfg.env.task.peg_length_m, cfg.env.task.clearance_m) == (0.06, 0.002)
    # A list, or any value that is not a mapping, still replaces the field.
    assert load_config(path, ["agent.hidden=[8]"]).agent.hidden == [8]
    with pytest.raises(ConfigError, match=r"agent: Input should be a valid dictionary"):
        load_config(path, ["agent=4"])


def test_a_physics_step_far_below_the_control_period_is_refused():
    """1e-7 s would run 10^6 physics steps per control step: collect and train would seem to hang."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["env.task.physics_dt_s=1e-7"])
    assert "env.task.physics_dt_s: Input should be greater than or equal to 0.0001 (got 1e-07)" in str(err.value)
    assert load_config(None, ["env.task.physics_dt_s=0.0001"]).env.task.physics_dt_s == 0.0001
    assert "at least 1e-4 s" in SimTaskConfig.model_fields["physics_dt_s"].description


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_config_file_is_refused_naming_it(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"config file {path} holds no settings (it is empty or only comments); leave out --config to run on the "
        "embedded defaults"
    )


def test_a_bad_value_is_named_by_the_override_or_flag_that_set_it(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("agent:\n  utd: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["agent.utd=4", "agent.num_critics=1"])
    assert str(err.value).splitlines() == [
        "invalid configuration (--set agent.num_critics=1):",
        "  agent.num_critics: Input should be greater than or equal to 2 (got 1)",
    ]
    with pytest.raises(ConfigError, match=r"^invalid configuration \(--seed 5000000000\):"):
        load_config(path, ["seed=5000000000"], flags={"seed=5000000000": "--seed 5000000000"})
    with pytest.raises(ConfigError, match=r"^invalid configuration \(--set agent=\{num_critics: 1\}\):"):
        load_config(path, ["agent={num_critics: 1}"])
    # A value of the file is named by the file, even with --set overrides of other fields.
    path.write_text("agent:\n  utd: 0\n")
    with pytest.raises(ConfigError, match=rf"^invalid configuration \({path}\):\n  agent.utd: "):
        load_config(path, ["agent.num_critics=4"])
    with pytest.raises(ConfigError, match=rf"^invalid configuration \({path}\):\n  agent.utd: "):
        load_config(path, ["agent={num_critics: 4}"])  # merged: utd still comes from the file
    # A check across fields of a section that both gave values to: both named.
    path.write_text("env:\n  safety:\n    xyz_high: [0.05, 0.05, 0.06]\n")
    with pytest.raises(ConfigError, match=rf"^invalid configuration \({path} with --set overrides\):\n  env.safety: "):
        load_config(path, ["env.safety.xyz_low=[0.1, 0.0, 0.0]"])


@pytest.mark.parametrize(
    ("override", "value"),
    [("bc.steps=1e9", 1_000_000_000), ("bc.steps=2.5e3", 2500), ("agent.critic_lr=3E-4", 3e-4), ("bc.lr=+1e-3", 1e-3)],
)
def test_a_set_value_in_exponent_form_is_a_number(override, value):
    """YAML 1.1 reads 1e9 (no '.', no exponent sign) as a string; --set reads it as the number it is written as."""
    section, field = override.split("=")[0].split(".")
    assert getattr(getattr(load_config(None, [override]), section), field) == value
    with pytest.raises(ConfigError, match=r"bc.steps: Input should be a valid integer, got a number with a fractional"):
        load_config(None, ["bc.steps=1.5e0"])
    with pytest.raises(ConfigError, match=r"bc.steps: Input should be a valid integer, unable to parse string"):
        load_config(None, ["bc.steps='1e9'"])  # quoted: the string it says it is
    with pytest.raises(ConfigError, match=r"reconnect_attempts: true/false where a number is expected"):
        load_config(None, ["env.franka.reconnect_attempts=true"])  # a bool is not read as 1


@pytest.mark.parametrize(("scale", "bias"), [(10.0, -1.0), (1.0, 0.0), (5.0, 5.0), (1.0, 0.5)])
def test_the_value_range_holds_every_return_an_episode_can_have(scale, bias):
    """The clip range of TD targets and Q^_BC holds the return of any episode: failing forever, or succeeding (which
    terminates) after any number of steps. With a positive bias every step's reward adds up (paper: +5 for Adroit)."""
    from robot_rl.config import AgentConfig

    cfg = AgentConfig(reward_scale=scale, reward_bias=bias)
    low, high = cfg.value_range
    gamma = cfg.discount
    fail, success = bias, scale + bias
    returns = [fail / (1 - gamma)]  # never succeeding, never ending
    returns += [fail * (1 - gamma**k) / (1 - gamma) + gamma**k * success for k in (0, 1, 10, 100, 10_000)]
    assert all(low - 1e-9 <= g <= high + 1e-9 for g in returns), (low, high, returns)
    # ...and is no wider than the extremes need.
    assert low == pytest.approx(min(min(returns), 0.0), abs=1e-6)
    assert high == pytest.approx(max(max(returns), 0.0), rel=1e-3)


def test_camera_images_must_suit_the_encoders_convs_and_shift():
    """Three unpadded 3x3 stride-2 convs need 15 px; a shift of half the image or more shows mostly padding. Both are
    refused when the config is read, not when a network is built after demonstrations were collected."""
    camera = "env.cameras=[{name: front, out_size: %d}]"
    assert load_config(None, [camera % 15]).env.cameras[0].out_size == 15
    with pytest.raises(ConfigError, match=r"front: out_size 14 for bc.encoder: 14 px is too small for 3 stride-2 "
                       r"convs \(channels \[32, 64, 64\]\): at least 15 px"):  # fmt: skip
        load_config(None, [camera % 14])
    assert load_config(None, [camera % 14, "bc.encoder.channels=[8, 8]", "agent.encoder.channels=[8, 8]"])
    with pytest.raises(ConfigError, match=r"out_size 84 for agent.encoder: 84 px is too small for 6 stride-2 convs"):
        load_config(None, [camera % 84, "agent.encoder.channels=[8, 8, 8, 8, 8, 8]"])
    with pytest.raises(ConfigError, match=r"front: out_size 15 for bc.encoder: a random shift of up to 8 px"):
        load_config(None, [camera % 15, "bc.encoder.shift_pad=8"])
    assert load_config(None, [camera % 15, "bc.encoder.shift_pad=7"]).bc.encoder.shift_pad == 7
    # A network built for a smaller image (a BC policy or demonstrations from elsewhere) says so, not torch's error.
    from robot_rl.config import EncoderConfig
    from robot_rl.networks import CameraEncoders

    assert CameraEncoders(["front"], 15, 15, EncoderConfig()).feature_dim == 64
    with pytest.raises(ValueError, match=r"a 14x20 image is too small for 3 stride-2 convs: at least 15 px a side"):
        CameraEncoders(["front"], 14, 20, EncoderConfig())
