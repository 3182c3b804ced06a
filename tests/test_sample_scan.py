"""`lit_amdet.sample_scan`: detection quality on planted outliers, the report files, bad input, predictions."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from lit_amdet.errors import ConfigError, LitAmdetError
from lit_amdet.poisoning import PoisonedPairs
from lit_amdet.sample_scan import (
    EMBEDDINGS,
    check_detectors,
    gather_predictions,
    sample_features,
    save_embeddings,
    score_and_report,
)


def _planted(n_clean: int = 400, n_poison: int = 4, dim: int = 16, seed: int = 0):
    """A dense cluster of image/text pairs plus a few isolated, misaligned pairs (the 'poisons')."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    image = centre + 0.05 * torch.randn(n_clean + n_poison, dim, generator=g)
    text = image + 0.02 * torch.randn(n_clean + n_poison, dim, generator=g)
    poison = torch.arange(n_clean, n_clean + n_poison)
    image[poison] = torch.randn(n_poison, dim, generator=g)  # far from the cluster and from each other
    text[poison] = -image[poison]
    image, text = (torch.nn.functional.normalize(t, dim=1) for t in (image, text))
    labels = np.zeros(n_clean + n_poison, dtype=bool)
    labels[poison.numpy()] = True
    return image, text, labels


def test_score_and_report_finds_planted_outliers(tmp_path):
    image, text, labels = _planted()
    captions = [f"pair {i}" for i in range(len(labels))]
    report = score_and_report(torch.cat([image, text], 1), captions, labels,
                              ["kdist", "lid", "slof", "dao", "iforest", "lof", "clip"], 16, tmp_path,
                              image_text=(image, text), top=4, quiet=True)
    poisons = sorted(np.flatnonzero(labels).tolist())
    for name, m in report["metrics"].items():
        assert m["auroc"] == pytest.approx(1.0), name
        assert m["pr_auc"] == pytest.approx(1.0) and m["fpr_at_95_tpr"] == pytest.approx(0.0), name
        assert sorted(report["top"][name]) == poisons, name
    assert report["num_poisoned"] == 4 and json.loads((tmp_path / "report.json").read_text()) == report
    # every file written atomically: the report's files and report.json, no temporary sibling left
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*report["files"], "report.json"])
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == list(range(len(labels)))
    assert sum(int(r["poisoned"]) for r in rows) == 4


def test_bad_inputs_raise_config_error(tmp_path):
    image, text, labels = _planted(n_clean=40)
    x, captions = torch.cat([image, text], 1), ["c"] * len(labels)
    wrong = PoisonedPairs(list(range(10)), lambda im: im, rate=0.1).save_labels(tmp_path / "wrong.json")
    with pytest.raises(ConfigError, match="labels for 10 samples"):
        score_and_report(x, captions, wrong, ["kdist"], 4, tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="unknown detector"):
        score_and_report(x, captions, None, ["kdist", "mahalanobis"], 4, tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="k=44"):
        score_and_report(x, captions, None, ["kdist"], 44, tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="clip detector"):
        score_and_report(x, captions, None, ["clip"], 4, tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="xmodal detector"):
        score_and_report(x, captions, None, ["dao", "xmodal"], 4, tmp_path, quiet=True)
    with pytest.raises(ConfigError, match="reference_size"):  # checked for xmodal's own search too
        score_and_report(x, captions, None, ["xmodal"], 4, tmp_path, quiet=True, image_text=(image, text),
                         reference_size=3)
    with pytest.raises(ConfigError, match="needs image embeddings"):
        sample_features(None, text, "both")
    assert check_detectors(["kdist", "lid", "kdist"]) == ["kdist", "lid"]
    assert check_detectors(["dao+xmodal", "(dao+xgroup)+dao*xgroup"]) == ["dao+xmodal", "(dao+xgroup)+dao*xgroup"]
    for bad in ("dao+mahalanobis", "dao*(xgroup", "dao-xgroup"):
        with pytest.raises(ConfigError, match="unknown detector"):
            check_detectors([bad])
    with pytest.raises(ConfigError, match="xmodal detector"):  # a union's parts need what the parts need
        score_and_report(x, captions, None, ["dao+xmodal"], 4, tmp_path, quiet=True)


def test_a_union_of_detectors_is_scored_reported_and_cut_by(tmp_path):
    image, text, labels = _planted()
    captions = [f"pair {i}" for i in range(len(labels))]
    report = score_and_report(torch.cat([image, text], 1), captions, labels, ["dao+clip"], 8, tmp_path,
                              image_text=(image, text), quiet=True, budget=4, cut_by="dao+clip")
    assert report["detectors"] == ["dao+clip", "dao", "clip"]  # the parts reported beside the union
    with (tmp_path / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the union's ranks from the parts' ranks (exact integers; the scores are printed to 6 digits)
    best = {i: sorted(int(r[f"{d}_rank"]) for d in ("dao", "clip")) for i, r in enumerate(rows)}
    want = sorted(range(len(rows)), key=lambda i: (*best[i], i))
    assert sorted(range(len(rows)), key=lambda i: int(rows[i]["dao+clip_rank"])) == want
    assert report["cut"]["detector"] == "dao+clip" and report["cut"]["metrics"]["poisons_removed"] == 4


def _batch(index: list[int], dim: int = 3, image: bool = True) -> dict:
    out = {"index": torch.tensor(index), "caption": [f"c{i}" for i in index],
           "text": torch.tensor(index, dtype=torch.float32)[:, None].repeat(1, dim)}
    if image:
        out["image"] = -out["text"]
    return out


def test_gather_predictions_orders_and_drops_padding_repeats(tmp_path):
    # a distributed sampler pads the last batch with repeats of the first samples
    data = gather_predictions([_batch([2, 3, 0]), _batch([1, 2])])
    assert data["index"].tolist() == [0, 1, 2, 3] and data["caption"] == ["c0", "c1", "c2", "c3"]
    assert data["text"][:, 0].tolist() == [0.0, 1.0, 2.0, 3.0] and torch.equal(data["image"], -data["text"])
    assert gather_predictions([_batch([0, 1], image=False)])["image"] is None
    with pytest.raises(LitAmdetError, match="distinct indices"):
        gather_predictions([_batch([0, 2])])

    from safetensors import safe_open

    path = save_embeddings(tmp_path / "run" / EMBEDDINGS, data, "both", "enc")
    assert [p.name for p in path.parent.iterdir()] == [EMBEDDINGS]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"modality": "both", "encoder": "enc"}
        assert set(f.keys()) == {"index", "text", "image"} and torch.equal(f.get_tensor("index"), data["index"])
    both = sample_features(data["image"], data["text"], "both")
    assert torch.equal(both, torch.cat([data["image"], data["text"]], 1))
