"""A scan stopped by SIGINT or SIGTERM exits 128 + the signal's number with one line and no report.

Before `lit_amdet.interrupts`, a SIGTERM in the search exited 0 (clean's code: Lightning's ``SIGTERMException`` is a
``SystemExit`` with no code), Ctrl+C in the search exited 1 (BACKDOORED's: Lightning's ``sys.exit(1)``), and a
SIGTERM after the search (the typed probe runs in ``on_train_end``) was only noted and the scan ran on to a verdict.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from lit_amdet.cli import main
from lit_amdet.interrupts import Interrupted, interruption, signals_stop
from lit_amdet.modules import BackdoorDetection

QUIET = ["--model.init_args.benign_stop", "false", "--trainer.logger", "false", "--trainer.enable_progress_bar",
         "false", "--model.init_args.evidence_callbacks", "false"]


def _steps(n: int) -> list[str]:
    """A search of ``n`` steps with no check that could stop it sooner."""
    return ["--trainer.max_steps", str(n), "--model.init_args.check_every", "100000", *QUIET]


def _scan_stopped(tiny_models, tmp_path, capsys, monkeypatch, signum, hook, steps):
    """Run a scan in this process that sends itself ``signum`` in ``hook``; its exit code, stderr and files."""
    real = getattr(BackdoorDetection, hook)

    def signalled(self, *args, **kwargs):
        os.kill(os.getpid(), signum)  # delivered here, before the next bytecode: as a signal from outside would be
        return real(self, *args, **kwargs)

    monkeypatch.setattr(BackdoorDetection, hook, signalled)
    out = tmp_path / "run"
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit) as info:
        main(["detect", "--model.init_args.suspect", str(tiny_models["clip"]), "--model.init_args.anchor",
              str(tiny_models["clip"]), "--model.init_args.output_dir", str(out), "--trainer.default_root_dir",
              str(tmp_path), *_steps(steps)])
    assert {s: signal.getsignal(s) for s in previous} == previous  # the handlers the command found are back
    return info.value.code, capsys.readouterr().err.strip().splitlines(), out


@pytest.mark.parametrize(("signum", "hook"), [
    (signal.SIGTERM, "training_step"),  # was exit 0: Lightning's SIGTERMException has no code
    (signal.SIGINT, "training_step"),  # was exit 1: Lightning's sys.exit(1) after a KeyboardInterrupt
    (signal.SIGTERM, "on_train_end"),  # was a verdict: no loop reads Lightning's flag after the search
])
def test_a_signal_stops_a_scan_with_its_own_exit_code_and_no_report(signum, hook, tiny_models, tmp_path, capsys,
                                                                    monkeypatch):
    steps = 2 if hook == "on_train_end" else 100000  # the end of the search at once, or a search with no end
    code, err, out = _scan_stopped(tiny_models, tmp_path, capsys, monkeypatch, signum, hook, steps)
    assert code == 128 + signum
    assert err[-1] == (f"lit-amdet: stopped by {signal.Signals(signum).name}: no verdict; files are written whole or "
                       "not at all, so what was not finished is not there")
    assert not (out / "report.json").exists() and not list(tmp_path.rglob("report.json"))


def test_the_console_command_stopped_by_sigterm_from_outside(tiny_models, tmp_path):
    """As a job scheduler stops it: a separate process, SIGTERM once it has loaded both models."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "lit_amdet", "detect", "--model.init_args.suspect", str(tiny_models["clip"]),
         "--model.init_args.anchor", str(tiny_models["clip"]), "--model.init_args.output_dir", str(out),
         "--trainer.default_root_dir", str(tmp_path), *_steps(100000)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        for line in proc.stdout:  # the features are cached just before the first step
            if "feature cache" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("lit-amdet: stopped by SIGTERM: no verdict")
    assert "Traceback" not in err and not list(tmp_path.rglob("report.json"))


def test_interruption_is_found_behind_the_exit_lightning_raises_for_it():
    try:
        try:
            raise Interrupted(signal.SIGTERM)
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning's fit does with it
    except SystemExit as exc:
        stop = interruption(exc)
    assert stop is not None and stop.name == "SIGTERM" and stop.exit_code == 143
    assert interruption(SystemExit(1)) is None and interruption(ValueError("x")) is None


def test_signals_stop_restores_the_handlers_it_found():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info, signals_stop():
        os.kill(os.getpid(), signal.SIGTERM)
    assert info.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) == before
