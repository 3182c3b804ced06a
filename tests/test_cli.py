"""The command line: subcommands listed, any LightningModule runs by class_path, errors are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lit_amdet.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lit_amdet", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for sub in ("fit", "validate", "test", "predict", "detect", "inspect", "scan_data"):
        assert sub in out.stdout


def test_fit_accepts_any_lightning_module_by_class_path(tmp_path):
    main([
        "fit",
        "--model", "lightning.pytorch.demos.boring_classes.BoringModel",
        "--trainer.fast_dev_run", "1",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.accelerator", "cpu",
    ])


def test_inspect_prints_facts(tiny_models, capsys):
    main(["inspect", "--checkpoint", str(tiny_models["longclip"])])
    out = capsys.readouterr().out
    facts = json.loads(out[out.index("{"):])
    assert facts["family"] == "longclip" and facts["context_length"] == 248 and facts["causal"] is True
    assert len(facts["sha256"]) == 64


def test_detect_needs_the_detection_module(capsys):
    with pytest.raises(SystemExit) as info:
        main(["detect", "--model", "lightning.pytorch.demos.boring_classes.BoringModel"])
    assert info.value.code == 2
    assert "BackdoorDetection" in capsys.readouterr().err.strip().splitlines()[-1]


def test_subcommand_without_model_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--trainer.fast_dev_run", "1"])
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("lit-amdet: error: fit needs a model")
