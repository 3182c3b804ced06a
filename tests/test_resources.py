"""lit_amdet.resources: shipped configs are found by name from anywhere; paths are taken as given."""

from __future__ import annotations

import pytest

from lit_amdet.errors import ConfigError
from lit_amdet.resources import config_path, shipped_configs


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
