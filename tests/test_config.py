"""The config tree: YAML files, --set overrides, and refusals that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from robot_rl.config import ConfigError, RunConfig, dump_config, load_config

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
