"""Screening: what several suspects, a folder of them and multi-encoder containers expand to, and a detect run
on every container layout ending in verdicts under the right names (tiny random models: plumbing and names only;
the real MiniLM screening, where verdicts matter, is in test_detection.py)."""

from __future__ import annotations

import csv
import json

import pytest

from lit_amdet.cli import main
from lit_amdet.errors import CheckpointError, ConfigError
from lit_amdet.resources import config_path
from lit_amdet.screening import ERROR, Target, model_rows, scan_targets, worst
from tests import sd_files

FAST = ["--model.init_args.restarts", "1", "--model.init_args.pooled_restarts", "0", "--trainer.max_steps", "2",
        "--model.init_args.probe_prompts", "16", "--model.init_args.holdout_prompts", "8",
        "--model.init_args.batch_size", "4", "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    clip, clip_b = sd_files.clip_text(root / "clip"), sd_files.clip_text(root / "clip_b", seed=4)
    oc, oc_b = sd_files.open_clip_model(), sd_files.open_clip_model(seed=6)
    sd1 = root / "sd1"
    sd1.mkdir()
    sd_files.sd1_file(sd1 / "sd15-merge.safetensors", clip)
    sd_files.pipeline(sd1 / "sd15-pipeline", {"text_encoder": clip})
    return {"root": root, "clip": clip, "clip_b": clip_b, "sd1": sd1,
            "sd2": sd_files.sd2_file(root / "sd21-ft.safetensors", oc),
            "sd2_base": sd_files.sd2_file(root / "sd21-base.safetensors", oc_b),
            "sdxl": sd_files.sdxl_file(root / "xl-ft.safetensors", clip, oc),
            "sdxl_base": sd_files.sdxl_file(root / "xl-base.safetensors", clip_b, oc_b),
            "sdxl_pipe": sd_files.pipeline(root / "xl-pipe", {"text_encoder": clip, "text_encoder_2": clip_b})}


def test_targets_of_a_folder_a_list_and_sdxl(layouts):
    assert [(t.label, t.component) for t in scan_targets(str(layouts["sd1"]))] == [
        ("sd15-merge", "text_encoder"), ("sd15-pipeline", "text_encoder")]
    assert [t.label for t in scan_targets(str(layouts["sdxl"]))] == ["xl-ft.text_encoder", "xl-ft.text_encoder_2"]
    assert [t.label for t in scan_targets(str(layouts["sdxl"]), component="text_encoder_2")] == [
        "xl-ft.text_encoder_2"]
    both = scan_targets([str(layouts["clip"]), str(layouts["sdxl_pipe"])])
    assert [t.label for t in both] == ["clip", "xl-pipe.text_encoder", "xl-pipe.text_encoder_2"]
    assert [t.model for t in both] == ["clip", "xl-pipe", "xl-pipe"]


def test_a_broken_suspect_among_several_is_an_error_row_alone_an_error(layouts, tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\0" * 7)
    targets = scan_targets([str(layouts["clip"]), str(broken)])
    assert targets[0].error is None and "corrupt or truncated" in targets[1].error
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        scan_targets(str(broken))
    with pytest.raises(ConfigError, match="both named 'clip'"):
        scan_targets([str(layouts["clip"]), str(layouts["clip"])])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="neither a checkpoint nor a folder of checkpoints"):
        scan_targets(str(empty))


def test_a_model_is_as_bad_as_its_worst_encoder():
    assert worst(["clean", "inconclusive", "BACKDOORED"]) == "BACKDOORED"
    assert worst(["clean", ERROR]) == ERROR and worst(["clean", "clean"]) == "clean"
    rows = [{"model": "xl", "encoder": "text_encoder", "verdict": "clean", "seconds": "1.0"},
            {"model": "xl", "encoder": "text_encoder_2", "verdict": "BACKDOORED", "seconds": "2.5"},
            {"model": "sd15", "encoder": "", "verdict": "clean", "seconds": "1.0"}]
    (row,) = model_rows(rows)
    assert (row["model"], row["verdict"], row["decided_by"], row["seconds"]) == (
        "xl", "BACKDOORED", "BACKDOORED in text_encoder_2", "3.5")
    assert Target("a", None, "a", "a").error is None


def _detect(suspect, anchor, out, *extra) -> int:
    """The exit code of ``lit-amdet detect`` (0 when it returns)."""
    try:
        main(["detect", "--config", str(config_path("scan.yaml")), "--model.init_args.suspect", str(suspect),
              "--model.init_args.anchor", str(anchor), "--trainer.default_root_dir", str(out), *FAST, *extra])
    except SystemExit as exc:
        return exc.code
    return 0


def _summary(out):
    with open(out / "detect" / "summary.csv") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("case,anchor,names", [
    ("sd1", "clip", ["sd15-merge", "sd15-pipeline"]),
    ("sdxl", "sdxl_base", ["xl-ft.text_encoder", "xl-ft.text_encoder_2"]),
])
def test_detect_screens_each_layout_under_its_name(layouts, case, anchor, names, tmp_path, capsys):
    out = tmp_path / "runs"
    code = _detect(layouts[case], layouts[anchor], out)
    printed = capsys.readouterr().out
    rows = _summary(out)
    for name in names:
        report = json.loads((out / "detect" / name / "report.json").read_text())
        assert report["model"] == name and f"{name}: {report['verdict']}" in printed
        assert report["anchor"]["component"] == (report["suspect"]["component"] if anchor != "clip" else None)
    assert sorted(r["model"] + ("." + r["encoder"] if case == "sdxl" and r["encoder"] != "(model)" else "")
                  for r in rows if r["encoder"] != "(model)") == names
    assert code in (0, 1, 3) and (out / "detect" / "summary.md").is_file()
    if case == "sdxl":
        assert [r["verdict"] for r in rows if r["encoder"] == "(model)"] == [
            worst([r["verdict"] for r in rows if r["encoder"] != "(model)"])]


def test_a_suspect_that_cannot_be_opened_is_an_error_row_and_one_line_on_stderr(layouts, tmp_path, capsys):
    """Found by a review (session 2026-12-07): a folder of suspects holding one whose weights are a symlink to
    themselves ended the whole screening in "unexpected RuntimeError: Symlink loop" (Python 3.11's pathlib) after
    the first scan, with no summary. Now it is an error row like any unreadable suspect, the others are scanned,
    and exit code 2 comes with one line on stderr that says why."""
    import shutil

    folder = tmp_path / "suspects"
    shutil.copytree(layouts["clip"], folder / "good")
    loop = folder / "loop"
    loop.mkdir()
    shutil.copy(layouts["clip"] / "config.json", loop / "config.json")
    (loop / "model.safetensors").symlink_to("model.safetensors")
    out = tmp_path / "runs"
    code = _detect(folder, layouts["clip"], out)
    err = capsys.readouterr().err.strip().splitlines()
    rows = {r["model"]: r for r in _summary(out)}
    assert code == 2 and rows["good"]["verdict"] in ("clean", "BACKDOORED", "inconclusive")
    assert rows["loop"]["verdict"] == ERROR and "cannot be resolved" in rows["loop"]["decided_by"]
    assert err[-1].startswith("lit-amdet: error: 1 of 2 encoders could not be scanned (the first: loop: ")
    assert "Traceback" not in "\n".join(err)


def test_a_suspect_that_fails_in_a_way_no_check_foresaw_is_an_error_row_not_the_end(layouts, tmp_path, capsys,
                                                                                      monkeypatch):
    """Found by session 2026-12-07 (k)'s review: a folder of suspects holding one whose config.json was a list
    ended the whole screening after the first scan ("unexpected AttributeError", no summary), since only our own
    errors became rows. That input is now refused in one line (`tests/test_hostile.py`); any other failure of
    one suspect is its row too, named "unexpected <type>", and the rest are scanned."""
    import shutil

    from lit_amdet.modules import detection

    folder = tmp_path / "suspects"
    for name in ("a_good", "b_odd", "c_good"):
        shutil.copytree(layouts["clip"], folder / name)
    real = detection.load_encoder

    def load(ref, **kw):
        if "b_odd" in str(ref):
            raise AttributeError("'list' object has no attribute 'get'")
        return real(ref, **kw)

    monkeypatch.setattr(detection, "load_encoder", load)
    out = tmp_path / "runs"
    code = _detect(folder, layouts["clip"], out)
    err = capsys.readouterr().err.strip().splitlines()
    rows = {r["model"]: r for r in _summary(out)}
    assert code == 2 and set(rows) == {"a_good", "b_odd", "c_good"}
    assert rows["c_good"]["verdict"] != ERROR and rows["a_good"]["verdict"] != ERROR
    assert rows["b_odd"]["verdict"] == ERROR
    assert rows["b_odd"]["decided_by"] == "unexpected AttributeError: 'list' object has no attribute 'get'"
    assert err[-1].startswith("lit-amdet: error: 1 of 3 encoders could not be scanned (the first: b_odd: ")


def test_an_earlier_report_that_is_damaged_is_scanned_again_not_a_crash(tmp_path):
    """Found by the same review: a rerun read an earlier run folder's report.json as finished and ended in
    "unexpected AttributeError" (a list there) or "KeyError: 'verdict'" (a report cut short), or stopped the whole
    screening on JSON that did not parse. Such a target is now scanned again; a whole report is still reused."""
    from lit_amdet.screening import finished_report

    target = Target("suspects/m", None, "m", "m")
    run_dir = tmp_path / "m"
    run_dir.mkdir()
    whole = {"suspect": {"path": "suspects/m"}, "hyperparameters": {"component": None}, "verdict": "clean",
             "decided_by": "no path", "seconds": 1.0, "nearest_captions": [{"caption": "a cat"}], "checks": []}
    for damaged in ("[1]", "{", json.dumps({k: whole[k] for k in ("suspect", "hyperparameters")}),
                    json.dumps({**whole, "nearest_captions": "a cat"}), "[" * 100_000):
        (run_dir / "report.json").write_text(damaged)
        assert finished_report(run_dir, target) is None
    (run_dir / "report.json").write_text(json.dumps(whole))
    assert finished_report(run_dir, target) == whole
    assert finished_report(run_dir, Target("elsewhere/m", None, "m", "m")) is None


def test_detect_on_a_single_sd2_file_is_one_scan_named_after_the_file(layouts, tmp_path):
    out = tmp_path / "runs"
    _detect(layouts["sd2"], layouts["sd2_base"], out)
    report = json.loads((out / "detect" / "sd21-ft" / "report.json").read_text())
    assert report["model"] == "sd21-ft" and report["suspect"]["component"] == "text_encoder"
    assert not (out / "detect" / "summary.csv").exists()  # one encoder: the plain scan, no screening


def test_two_processes_deal_the_encoders_and_write_one_summary(layouts, tmp_path):
    """DDP on 2 CPU processes: the four encoders of two SDXL files are dealt round-robin and process 0 writes
    the one summary, in the targets' order, and exits with the worst verdict's code (run as a command:
    Lightning's launcher re-runs sys.argv). In CI process 1 once exited with its own verdict's code 3 first and
    the launcher killed process 0 (-9) before it wrote the summary."""
    import os
    import subprocess
    import sys

    out = tmp_path / "runs"
    suspects = f"[{layouts['sdxl']}, {layouts['sdxl_base']}]"
    done = subprocess.run(
        [sys.executable, "-m", "lit_amdet", "detect", "--model.init_args.suspect", suspects,
         "--model.init_args.anchor", str(layouts["sdxl_base"]), "--trainer.default_root_dir", str(out),
         "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2", *FAST],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    rows = _summary(out) if (out / "detect" / "summary.csv").is_file() else []
    assert rows, done.stderr[-2000:]
    # process 0's exit code is the worst verdict of all four scans (process 1's own verdict never ends the run)
    codes = {"clean": 0, "BACKDOORED": 1, ERROR: 2, "inconclusive": 3}
    assert done.returncode == codes[worst([r["verdict"] for r in rows])], done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    assert [(r["model"], r["encoder"]) for r in rows] == [
        ("xl-ft", "text_encoder"), ("xl-ft", "text_encoder_2"), ("xl-base", "text_encoder"),
        ("xl-base", "text_encoder_2"), ("xl-ft", "(model)"), ("xl-base", "(model)")]
    assert all((out / "detect" / f"{m}.{e}" / "report.json").is_file() for m, e in
               [(r["model"], r["encoder"]) for r in rows[:4]])
    assert not list((out / "detect").glob(".screen-rank*"))
