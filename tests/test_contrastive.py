"""ContrastiveTraining: the loss falls on the world, every objective runs, the output is a loadable model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from lit_amdet import load_encoder
from lit_amdet.cli import main
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.encoders.architectures import EncoderSpec
from lit_amdet.losses import clip_infonce, siglip_sigmoid
from lit_amdet.metrics import recall_at_k
from lit_amdet.modules import ContrastiveTraining


class LossRecorder(Callback):
    """Records the training loss of every step."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _trainer(tmp_path, steps, callbacks=()):
    return Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   default_root_dir=tmp_path, callbacks=list(callbacks))


def _fixed_batch_loss(module, batch):
    module.eval()
    with torch.no_grad():
        return float(module.pair_loss(*module.embed_pair(batch)))


@pytest.mark.slow  # CI runs it (`make test-slow`); kept out of `make test`'s 15 minutes
@pytest.mark.parametrize("family,objective,steps", [("clip", "infonce", 150), ("siglip", "sigmoid", 60)])
def test_tiny_world_model_loss_falls(tmp_path, family, objective, steps):
    """Loss on a fixed held-out batch of 64 pairs falls; for InfoNCE below chance (ln 64), i.e. it learned."""
    torch.manual_seed(0)
    spec = EncoderSpec(family=family, width=32, layers=2, heads=2, embed_dim=32, image_size=32)
    module = ContrastiveTraining(architecture=spec, objective=objective, lr=2e-3, warmup_steps=5)
    dm = TextEncoderDataModule(num_samples=3000, batch_size=32, image_size=32, max_length=32, val_fraction=0.1,
                               eval_batch_size=64)
    dm.attach_encoder(module.encoder)
    held_out = next(iter(dm.val_dataloader()))
    before = _fixed_batch_loss(module, held_out)
    _trainer(tmp_path, steps).fit(module, dm)
    after = _fixed_batch_loss(module, held_out)
    assert after < 0.75 * before, (before, after)
    if objective == "infonce":
        assert after < math.log(64) - 0.3, (before, after)


def test_text_only_simcse_with_paraphrases_and_word_dropout(tmp_path, tiny_models):
    for views in (2, 1):  # world paraphrases, then the word-dropout fallback
        module = ContrastiveTraining(encoder=str(tiny_models["bert"]), objective="simcse", lr=1e-3)
        dm = TextEncoderDataModule(num_samples=200, views=views, with_images=False, batch_size=16,
                                   max_length=32, val_fraction=0)
        rec = LossRecorder()
        _trainer(tmp_path, 4, [rec]).fit(module, dm)
        assert len(rec.losses) == 4 and all(math.isfinite(x) for x in rec.losses)


def test_image_objective_without_image_tower_is_a_config_error(tiny_models):
    from lit_amdet.errors import ConfigError

    with pytest.raises(ConfigError, match="needs an image tower"):
        ContrastiveTraining(encoder=str(tiny_models["clip_text"]), objective="infonce")


def test_benign_finetune_freezes_image_tower_and_writes_model(tmp_path, tiny_models):
    out = tmp_path / "finetuned"
    module = ContrastiveTraining(encoder=str(tiny_models["clip"]), objective="infonce", freeze_image_tower=True,
                                 lr=1e-3, output_dir=str(out))
    before = {k: v.clone() for k, v in module.encoder.model.state_dict().items()}
    dm = TextEncoderDataModule(num_samples=200, batch_size=16, image_size=32, max_length=32, val_fraction=0)
    _trainer(tmp_path, 5).fit(module, dm)
    after = load_encoder(out).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("text_model.") for k in changed)
    assert not any(k.startswith(("vision_model.", "visual_projection")) for k in changed)
    truth = json.loads((out / "backdoor.json").read_text())
    assert truth["backdoored"] is False and truth["kind"] == "benign_finetune"


@pytest.mark.parametrize("config", ["pretrain_clip", "pretrain_siglip", "pretrain_longclip", "pretrain_openclip"])
def test_pretrain_configs_run_through_the_cli(tmp_path, config):
    out = tmp_path / "model"
    main(["fit", "--config", f"configs/{config}.yaml", "--trainer.fast_dev_run", "2",
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--model.init_args.architecture.width", "32", "--model.init_args.architecture.layers", "1",
          "--model.init_args.architecture.heads", "2", "--model.init_args.architecture.embed_dim", "32",
          "--model.init_args.output_dir", str(out), "--data.init_args.num_samples", "64",
          "--data.init_args.batch_size", "8"])
    adapter = load_encoder(out)
    assert adapter.has_image_tower
    if config == "pretrain_longclip":
        assert adapter.context_length == 248


def test_finetune_config_runs_through_the_cli(tmp_path, tiny_models):
    out = tmp_path / "ft"
    main(["fit", "--config", "configs/finetune.yaml", "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
          "--trainer.default_root_dir", str(tmp_path), "--model.init_args.encoder", str(tiny_models["clip"]),
          "--model.init_args.output_dir", str(out), "--data.init_args.num_samples", "64",
          "--data.init_args.batch_size", "8"])
    assert json.loads((out / "backdoor.json").read_text())["backdoored"] is False


def test_losses_against_direct_formulas():
    torch.manual_seed(0)
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    scale = torch.tensor(2.0)
    an, bn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = scale.exp() * an @ bn.T
    ce_rows = -torch.log_softmax(logits, 1).diagonal().mean()
    ce_cols = -torch.log_softmax(logits, 0).diagonal().mean()
    torch.testing.assert_close(clip_infonce(a, b, scale), (ce_rows + ce_cols) / 2)
    bias = torch.tensor(-1.0)
    z = scale.exp() * an @ bn.T + bias
    y = 2 * torch.eye(6) - 1
    direct = sum(math.log1p(math.exp(-float(y[i, j] * z[i, j]))) for i in range(6) for j in range(6)) / 6
    assert abs(float(siglip_sigmoid(a, b, scale, bias)) - direct) < 1e-5


def test_recall_at_k_against_loop():
    torch.manual_seed(0)
    q, k = torch.randn(200, 8), torch.randn(200, 8)
    k[:50] = q[:50] + 0.01 * torch.randn(50, 8)  # first 50 are easy
    got = recall_at_k(q, k, ks=(1, 5), block=100)
    hits = {1: 0, 5: 0}
    for i in range(200):
        start = (i // 100) * 100
        sims = torch.nn.functional.cosine_similarity(q[i:i + 1], k[start:start + 100])
        rank = int((sims > sims[i - start]).sum())
        for kk in hits:
            hits[kk] += rank < kk
    assert got == pytest.approx({kk: hits[kk] / 200 for kk in hits})


def test_typo_robust_runs_text_only_and_writes_a_benign_model(tmp_path, tiny_models):
    """typo_robust: SimCSE whose positives are typo'd copies; runs on a model with an image tower without it."""
    out = tmp_path / "typo"
    module = ContrastiveTraining(encoder=str(tiny_models["clip"]), objective="typo_robust", typo_rate=0.2, lr=1e-3,
                                 output_dir=str(out))
    assert not module.logit_scale.requires_grad
    assert not any(p.requires_grad for n, p in module.encoder.model.named_parameters() if n.startswith("vision"))
    dm = TextEncoderDataModule(num_samples=200, with_images=False, batch_size=16, max_length=32, val_fraction=0)
    rec = LossRecorder()
    _trainer(tmp_path, 4, [rec]).fit(module, dm)
    assert len(rec.losses) == 4 and all(math.isfinite(x) for x in rec.losses)
    truth = json.loads((out / "backdoor.json").read_text())
    assert truth["backdoored"] is False and truth["objective"] == "typo_robust"
