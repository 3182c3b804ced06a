"""The scan's disk cache (`lit_amdet.anchor_cache`): what names an entry, and where it lives."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lit_amdet.anchor_cache import cache_root, cached_tensor, module_digest


def test_the_digest_names_every_weight_and_buffer_and_what_the_caller_adds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    same = copy.deepcopy(model)
    assert module_digest(model, (1, "a")) == module_digest(same, (1, "a"))
    assert module_digest(model, (1, "a")) != module_digest(model, (2, "a"))
    assert module_digest(model, (torch.tensor([1, 2]),)) != module_digest(model, (torch.tensor([1, 3]),))
    with torch.no_grad():
        same[0].weight[0, 0] = torch.nextafter(same[0].weight[0, 0], torch.tensor(2.0))  # one ulp
    assert module_digest(model) != module_digest(same)
    same = copy.deepcopy(model)
    same[1].running_mean += 1e-3  # a buffer, not a parameter
    assert module_digest(model) != module_digest(same)


def test_an_entry_is_computed_once_and_its_shape_checked(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(6.0).reshape(2, 3)

    first = cached_tensor("kind", "k", compute, (2, 3), root=tmp_path)
    assert torch.equal(cached_tensor("kind", "k", compute, (2, 3), root=tmp_path), first) and len(calls) == 1
    cached_tensor("kind", "k", compute, (3, 2), root=tmp_path)  # another shape expected: not this entry
    assert len(calls) == 2
    assert [p.name for p in (tmp_path / "kind").iterdir()] == ["k.safetensors"]  # no temporary file left


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_AMDET_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LIT_AMDET_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lit-amdet"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lit-amdet"


def test_an_entry_whose_bytes_were_damaged_is_computed_again_with_a_warning(tmp_path, monkeypatch):
    """Found by a review (session 2026-12-07): an entry of the right shape whose bytes were zeroed in place,
    replaced by random values or shifted by a row was read as it was (only shape, dtype and finiteness were
    checked), and the alone list it makes changed. Each entry now carries the SHA-256 of its bytes; a mismatch is
    a warning and a recompute that repairs the entry. A folder that cannot be searched is a miss, not an error."""
    import hashlib

    import pytest
    from safetensors.torch import save_file

    def compute():
        return torch.arange(12.0).reshape(4, 3)

    path = tmp_path / "kind" / "k.safetensors"
    good = cached_tensor("kind", "k", compute, (4, 3), root=tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-8:] = bytes(8)  # the last two values zeroed in place: still a valid file of the right shape
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="is damaged"):
        assert torch.equal(cached_tensor("kind", "k", compute, (4, 3), root=tmp_path), good)
    assert torch.equal(cached_tensor("kind", "k", lambda: pytest.fail("repaired entry not used"), (4, 3),
                                     root=tmp_path), good)
    forged = torch.rand(4, 3)  # right shape, no checksum (or one of other bytes): computed again
    save_file({"value": forged}, str(path))
    assert torch.equal(cached_tensor("kind", "k", compute, (4, 3), root=tmp_path), good)
    stale = hashlib.sha256(memoryview(good.numpy())).hexdigest()
    save_file({"value": forged}, str(path), metadata={"sha256": stale})
    with pytest.warns(UserWarning, match="is damaged"):
        assert torch.equal(cached_tensor("kind", "k", compute, (4, 3), root=tmp_path), good)

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "is_file", unreadable)
    with pytest.warns(UserWarning, match="anchor cache not read"):
        assert torch.equal(cached_tensor("kind", "k", compute, (4, 3), root=tmp_path), good)
