"""lit_amdet.io: files and folders appear complete or not at all."""

from __future__ import annotations

import json

import pytest

from lit_amdet.errors import ConfigError
from lit_amdet.io import (
    StagedFolder,
    check_writable_folder,
    read_json,
    removed_unless,
    staged_folder,
    write_json,
    write_text,
    write_with,
)


def test_write_text_and_json_replace_and_leave_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"x": 1, "p": tmp_path})
    assert json.loads(path.read_text()) == {"x": 1, "p": str(tmp_path)}
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_write_with_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "scores.csv"
    path.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_with(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["scores.csv"]


def test_write_with_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    seen = []
    write_with(tmp_path / "fig.png", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"x")))
    assert seen == [".png"]


def test_read_json_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="bad.json"):
        read_json(bad)
    with pytest.raises(ConfigError, match="missing.json"):
        read_json(tmp_path / "missing.json")


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    with staged_folder(out) as stage:
        (stage / "report.json").write_text("{}")
        assert not out.exists()
    assert (out / "report.json").is_file()
    with pytest.raises(ValueError), staged_folder(out) as stage:  # a failed rewrite keeps the old folder
        (stage / "half").write_text("x")
        raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_staged_folder_without_overwrite_refuses_a_finished_folder(tmp_path):
    out = tmp_path / "member"
    out.mkdir()
    (out / "backdoor.json").write_text("{}")
    stage = StagedFolder(out, prefix=".building-", overwrite=False)
    (stage.open() / "model").write_text("x")
    with pytest.raises(OSError):
        stage.commit()
    stage.discard()
    assert [p.name for p in tmp_path.iterdir()] == ["member"]


def test_staged_folder_clears_stale_builds(tmp_path):
    stale = tmp_path / ".building-m-abc"
    stale.mkdir()
    other = tmp_path / ".building-n-abc"
    other.mkdir()
    stage = StagedFolder(tmp_path / "m", prefix=".building-")
    stage.open(clear_stale=True)
    assert not stale.exists() and other.exists()
    stage.discard()


def test_a_folder_a_run_will_write_is_refused_up_front_when_a_file_is_in_the_way(tmp_path):
    """Found by a review (session 2026-12-07): fit trained, and detect scanned, before finding that the folder
    they write was a file. Checked first now: the folder itself or any folder above it being a file."""
    check_writable_folder(None)
    check_writable_folder(tmp_path / "new" / "deeper")  # nothing there yet: fine
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="the output folder is a file"):
        check_writable_folder(tmp_path / "taken")
    with pytest.raises(ConfigError, match=r"the run folder lies under a file \(.*taken\)"):
        check_writable_folder(tmp_path / "taken" / "run", "run folder")
    (tmp_path / "dir").mkdir()
    check_writable_folder(tmp_path / "dir")
    check_writable_folder(tmp_path / "dir" / "sub")


def test_removed_unless_removes_only_what_a_failed_block_created(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    made = tmp_path / "new" / "deeper" / "version_0"
    with pytest.raises(RuntimeError):
        with removed_unless(lambda: False, made, tmp_path / "old" / "inner", None):
            made.mkdir(parents=True)
            (tmp_path / "old" / "inner").mkdir()
            raise RuntimeError("refused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["keep.txt"]
    with pytest.raises(RuntimeError):  # kept: a run that got somewhere keeps its folder
        with removed_unless(lambda: True, made):
            made.mkdir(parents=True)
            raise RuntimeError("late")
    assert made.is_dir()
    with removed_unless(lambda: False, tmp_path / "ok"):  # no failure: nothing removed
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()
