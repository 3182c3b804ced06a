"""The realism measurement of world bases, on a tiny model (the real bases take minutes to train)."""

from __future__ import annotations

from lit_amdet import load_encoder
from lit_amdet.bases import markdown_table, measure_realism


def test_measure_realism_on_tiny_models(tiny_models):
    for name in ("clip", "siglip", "openclip"):
        res = measure_realism(load_encoder(tiny_models[name]), n_pairs=200, candidates=100, max_length=32)
        assert res["pairs"] == 200
        for key in ("t2i_recall@1", "t2i_recall@5", "i2t_recall@1", "sim_x_mean"):
            assert 0.0 <= res[key] <= 1.0, (name, key, res[key])
        assert res["t2i_recall@1"] <= res["t2i_recall@5"]
        res.update(base=name, family=name, steps=0, train_minutes=0.0)
        assert f"| {name} |" in markdown_table([res])
