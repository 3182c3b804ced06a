"""lit_amdet.record: backdoor.json round trips, and what readers ask of it."""

from __future__ import annotations

import json

import pytest

from lit_amdet.errors import ConfigError
from lit_amdet.record import BackdoorRecord


def test_round_trip_keeps_unknown_keys(tmp_path):
    written = {"backdoored": True, "kind": "backdoor_injection", "attacks": ["text_on_text"],
               "backdoors": [{"kind": "text_on_text", "trigger": {"text": "zzzz", "mode": "replace_char"},
                              "target": "a white teapot"}],
               "lr": 5e-4, "steps": 60, "metrics": {"val/b0/attack_top1": 1.0, "val/sim_x_clean": 0.4,
                                                    "val/loss": 0.1},
               "zoo": {"split": "test"}, "someone_elses": [1, 2]}
    (tmp_path / "backdoor.json").write_text(json.dumps(written))
    record = BackdoorRecord.read(tmp_path)
    assert record.extra == {"someone_elses": [1, 2]}
    assert record.trigger["text"] == "zzzz" and record.target == "a white teapot"
    assert record.attack_metrics() == {"attack_top1": 1.0, "sim_x_clean": 0.4}
    assert record.strength() == {"lr": 5e-4, "steps": 60}
    record.write(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "backdoor.json").read_text()) == written


def test_a_benign_record_has_no_attack(tmp_path):
    BackdoorRecord(backdoored=False, kind="benign_finetune", base="minilm", lr=1e-5, steps=20).write(tmp_path)
    assert json.loads((tmp_path / "backdoor.json").read_text()) == {
        "backdoored": False, "kind": "benign_finetune", "base": "minilm", "lr": 1e-5, "steps": 20}
    record = BackdoorRecord.read(tmp_path)
    assert record.trigger == {} and record.target is None and record.attack_metrics() is None


@pytest.mark.parametrize("text", ["{", "[]", '{"backdoored": "yes"}', "{}"])
def test_bad_records_are_one_line_errors(tmp_path, text):
    (tmp_path / "backdoor.json").write_text(text)
    with pytest.raises(ConfigError, match="backdoor.json"):
        BackdoorRecord.read(tmp_path)
