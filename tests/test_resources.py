"""lit_amdet.resources: shipped configs are found by name from anywhere; paths are taken as given."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_amdet.errors import ConfigError
from lit_amdet.resources import asset_path, config_path, shipped_configs


def test_shipped_configs_by_name_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("scan.yaml", "scan", "configs/scan.yaml"):
        assert config_path(name) == shipped_configs() / "scan.yaml"
    assert (shipped_configs() / "assets" / "target.png").is_file()


def test_a_file_path_wins(tmp_path):
    own = tmp_path / "scan.yaml"
    own.write_text("model: {}\n")
    assert config_path(own) == own


def test_unknown_config_names_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="scan.yaml"):
        config_path(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        config_path("no_such_config")


def test_shipped_assets_from_another_folder(tmp_path, monkeypatch):
    from lit_amdet.triggers import Backdoor

    monkeypatch.chdir(tmp_path)
    target = shipped_configs() / "assets" / "target.png"
    assert asset_path("configs/assets/target.png") == asset_path("assets/target.png") == target
    assert Backdoor(target_images=["configs/assets/target.png"]).target_images == [str(target)]
    (tmp_path / "configs" / "assets").mkdir(parents=True)
    (tmp_path / "configs" / "assets" / "target.png").write_bytes(b"own")  # a file that exists is taken as given
    assert asset_path("configs/assets/target.png") == Path("configs/assets/target.png")
    for other in ("target.png", "data/assets/target.png", "configs/assets/nope.png"):
        assert asset_path(other) == Path(other)


def test_shipped_configs_give_model_and_data_one_max_length():
    """Lightning's logger refuses a hparam the module and the datamodule both have with two values (the data's
    max_length defaults to None): a shipped config that sets the model's sets the data's to the same."""
    import yaml

    for path in sorted(shipped_configs().glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        model = (config.get("model") or {}).get("init_args") or {}
        data = (config.get("data") or {}).get("init_args") or {}
        fitted = config.get("model", {}).get("class_path") != "lit_amdet.modules.BackdoorDetection"
        if fitted and "max_length" in model and config.get("trainer", {}).get("logger") is not False:
            assert data.get("max_length") == model["max_length"], path.name
