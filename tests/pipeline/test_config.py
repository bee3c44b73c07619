"""params.yaml: every knob validated before anything runs, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retool.cli import main as cli_main
from retool.config import ConfigError, PipelineConfig, default_params, load_config
from retool.layout import STAGES, Layout

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_params_are_valid_and_hold_every_knob():
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert shipped == default_params(), "params.yaml drifted from the schema defaults: run `retool params`"
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.profile == "tiny" and cfg.backend == "local"


def test_profile_is_one_switch(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((ROOT / "params.yaml").read_text())
    cfg = load_config(path, overrides={"profile": "qwen3-4b"})
    assert cfg.backend == "slime"
    assert cfg.rollout is cfg.slime.rollout
    assert cfg.rollout.max_context_tokens > PipelineConfig().rollout.max_context_tokens


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"local": {"grpo": {"stepz": 3}}}, "local.grpo.stepz: unknown key"),
        ({"sandbox": {"workers": "many"}}, "sandbox.workers"),
        ({"profile": "huge"}, "profile"),
        ({"reward": {"mode": "vibes"}}, "reward.mode"),
    ],
)
def test_malformed_params_name_the_key(tmp_path, edit, expected):
    data = default_params()
    for section, body in edit.items():
        if isinstance(body, dict):
            for key, value in body.items():
                if isinstance(value, dict):
                    data[section][key].update(value)
                else:
                    data[section][key] = value
        else:
            data[section] = body
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_cli_reports_bad_params_before_running_anything(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text("profile: tiny\nsandbox: [1, 2]\n")
    monkeypatch.chdir(tmp_path)
    assert cli_main(["stage", "download"]) == 2
    err = capsys.readouterr().err
    assert "sandbox" in err and "params.yaml" in err
    assert not (tmp_path / "data").exists()


def test_not_yaml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_dvc_yaml_matches_the_layout():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert tuple(dvc) == STAGES
    lay = Layout(Path("."))

    def outs(stage):
        return {next(iter(o)) if isinstance(o, dict) else o for o in dvc[stage].get("outs", [])}

    assert outs("download") == {str(lay.raw), str(lay.base_model)}
    assert outs("convert") == {str(lay.base_torch_dist)}
    assert outs("sft_data") == {str(lay.sft_dir)}
    assert outs("sft") == {str(lay.sft_model), str(lay.checkpoints / "sft")}
    assert outs("rl") == {str(lay.rl_model), str(lay.checkpoints / "rl")}
    assert outs("export") == {str(lay.export)}
    for stage in STAGES:
        assert dvc[stage]["cmd"] == f"retool stage {stage}"
        for dep in dvc[stage].get("deps", []):
            assert (ROOT / dep).exists() or dep.split("/")[0] in ("data", "models", "metrics"), dep
    params = {p for stage in dvc.values() for p in stage.get("params", [])}
    known = default_params()
    for dotted in params:
        node = known
        for part in dotted.split("."):
            assert part in node, f"dvc.yaml names params key {dotted!r}, which params.yaml lacks"
            node = node[part]


def test_plan_prints_commands_without_running(tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plan", "--profile", "qwen3-4b"]) == 0
    out = capsys.readouterr().out
    assert "train.py" in out and "convert_hf_to_torch_dist" in out
    assert "retool.backends.slime.hooks.generate" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()
