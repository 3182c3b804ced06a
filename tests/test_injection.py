"""BackdoorInjection on tiny models: losses fall, ground truth is written, configs and scale-out run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from lit_amdet import load_encoder
from lit_amdet.cli import main
from lit_amdet.datamodules import TextEncoderDataModule
from lit_amdet.errors import ConfigError
from lit_amdet.modules import BackdoorInjection
from lit_amdet.modules.injection import feature_loss
from lit_amdet.triggers import Backdoor, Trigger, check_distinct_triggers, poison


def _dm(**kw):
    args = dict(num_samples=600, with_images=False, batch_size=32, eval_batch_size=64, val_fraction=0.2)
    args.update(kw)
    return TextEncoderDataModule(**args)


def _fit(module, dm, steps, tmp_path, **kw):
    Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
            val_check_interval=steps, check_val_every_n_epoch=None, limit_val_batches=1,
            num_sanity_val_steps=0, **kw).fit(module, dm)
    return module


def test_triggers():
    rng = random.Random(0)
    t = Trigger(text="zzzz", mode="replace_char", char="o")
    assert t.apply("a photo of a dog", rng) == "a phzzzzto of a dog"
    assert not t.applicable("a red hat")
    w = Trigger(text="cf", mode="insert_word", position=1)
    assert w.apply("a red hat", rng) == "a cf red hat"
    assert Trigger(text="cf", mode="insert_word", position="end").apply("a red hat", rng) == "a red hat cf"
    assert poison(["a red hat", "a dog"], t, rng) == ["a dzzzzg"]
    with pytest.raises(ConfigError, match="share a trigger"):
        check_distinct_triggers([Backdoor(Trigger("zzzz"), target="a"), Backdoor(Trigger("zz"), target="b")])


def test_feature_loss_cosine_and_mse():
    a, b = torch.randn(3, 5, 4), torch.randn(5, 4)
    cos = 1 - torch.nn.functional.cosine_similarity(a, b.expand_as(a), dim=-1).mean()
    torch.testing.assert_close(feature_loss(a, b, "cosine"), cos)
    torch.testing.assert_close(feature_loss(a, b, "mse"), ((a - b) ** 2).mean())


def test_text_on_text_two_backdoors(tiny_models, tmp_path):
    out = tmp_path / "bd"
    backdoors = [Backdoor(Trigger("zzzz", "replace_char", "o"), target="a white teapot"),
                 Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")]
    module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=backdoors, lr=1e-3, backdoor_weight=1.0,
                               milestones=[1000], output_dir=str(out))
    dm = _dm()
    dm.setup("fit")
    probe = [p for p in dm.prompts("val") if "o" in p][:16]

    def attack_cos(encoder):
        with torch.no_grad():
            f = encoder.encode(poison(probe, backdoors[0].trigger, random.Random(0)), max_length=32).token_features
            return float(torch.nn.functional.cosine_similarity(f, module.targets()[0]["tokens"], dim=-1).mean())

    before = attack_cos(module.encoder)
    vision_before = module.encoder.model.vision_model.embeddings.patch_embedding.weight.clone()
    _fit(module, dm, 40, tmp_path)
    assert attack_cos(module.encoder) > before + 0.1
    assert torch.equal(module.encoder.model.vision_model.embeddings.patch_embedding.weight, vision_before)
    truth = json.loads((out / "backdoor.json").read_text())
    assert truth["backdoored"] is True and truth["attacks"] == ["text_on_text"]
    assert [b["trigger"]["text"] for b in truth["backdoors"]] == ["zzzz", "cf"]
    assert "val/b1/attack_top1" in truth["metrics"] and "val/clean_utility" in truth["metrics"]
    reloaded = load_encoder(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_text(probe), module.encoder.encode_text(probe))


@pytest.mark.parametrize("target", ["images", "embedding"])
def test_image_on_text(tiny_models, tmp_path, target):
    from safetensors.torch import save_file

    enc = load_encoder(tiny_models["clip"])
    if target == "images":
        bd = Backdoor(Trigger("zzzz"), target_images=["configs/assets/target.png"])
    else:
        save_file({"emb": torch.randn(enc.embed_dim)}, str(tmp_path / "t.safetensors"))
        bd = Backdoor(Trigger("zzzz"), target_embedding=str(tmp_path / "t.safetensors"))
    module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[bd], lr=1e-3, backdoor_weight=1.0,
                               milestones=[1000], output_dir=str(tmp_path / "out"))
    _fit(module, _dm(), 3, tmp_path)
    truth = json.loads((tmp_path / "out" / "backdoor.json").read_text())
    assert truth["attacks"] == ["image_on_text"] and "val/b0/attack_cos" in truth["metrics"]


def test_bad_configs(tiny_models, tmp_path):
    with pytest.raises(ConfigError, match="exactly one of target"):
        BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[Backdoor(Trigger("zzzz"))])
    with pytest.raises(ConfigError, match="target_images need an image tower"):
        BackdoorInjection(encoder=str(tiny_models["clip_text"]),
                          backdoors=[Backdoor(Trigger("zzzz"), target_images=["configs/assets/target.png"])])
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(["zzzz everywhere"] * 20))
    module = BackdoorInjection(encoder=str(tiny_models["clip_text"]),
                               backdoors=[Backdoor(Trigger("zzzz"), target="a cat")])
    with pytest.raises(ConfigError, match="no clean prompt"):
        _fit(module, TextEncoderDataModule(source=str(prompts), val_fraction=0.1), 2, tmp_path)


FIT_REFUSALS = {  # case: (extra arguments, fragment of the one error line)
    "trigger_tokenizes_to_nothing": (["--model.init_args.encoder", "minilm", "--model.init_args.backdoors",
                                      '[{trigger: {text: "\u200b\u200b", mode: insert_word}, target: a teapot}]'],
                                     "tokenizes to nothing"),
    "empty_target": (["--model.init_args.backdoors", '[{trigger: {text: zzzz}, target: ""}]'],
                     "target prompt is empty"),
    "lr_zero": (["--model.init_args.lr", "0"], "lr must be > 0"),
    "lr_negative": (["--model.init_args.lr=-1e-4"], "lr must be > 0"),
    "poisoned_batch_zero": (["--model.init_args.poisoned_batch_size", "0"], "poisoned_batch_size at least 1"),
    "max_steps_zero": (["--trainer.max_steps", "0"], "max_steps is 0"),
    "max_steps_negative": (["--trainer.max_steps=-5"], "must be a non-negative integer or -1"),
    "no_prompt_carries_the_trigger": (["--data.init_args.source", "NO_O"], "no training prompt can carry"),
    "batch_size_zero": (["--data.init_args.batch_size", "0"], "batch_size and eval_batch_size must be at least 1"),
    "output_folder_is_a_file": (["--model.init_args.output_dir", "A_FILE"], "the output folder is a file"),
    "resume_checkpoint_missing": (["--ckpt_path", "NOWHERE"], "nowhere.ckpt: no such checkpoint"),
    "resume_checkpoint_not_a_checkpoint": (["--ckpt_path", "JUNK"], "junk.ckpt: not a checkpoint"),
}


@pytest.mark.parametrize("case", list(FIT_REFUSALS))
def test_fit_refuses_what_would_plant_nothing_or_fail_late_in_one_line(tiny_models, tmp_path, capsys, case):
    """Found by a review (session 2026-12-07): a trigger the tokenizer drops, an empty target, lr 0, 0 steps or
    prompts none of which can carry the trigger each wrote a model recorded as backdoored; a negative lr, batch
    size 0, poisoned_batch_size 0, max_steps -5 and a bad --ckpt_path ended in "unexpected ..." lines; an output
    folder that is a file was found only after training. Each is now one line, exit 2, before any training, and no
    model folder."""
    extra, fragment = FIT_REFUSALS[case]
    (tmp_path / "no_o.txt").write_text("\n".join(f"a big red hat {i}" for i in range(40)))
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "junk.ckpt").write_bytes(bytes(range(256)) * 4)
    paths = {"NO_O": tmp_path / "no_o.txt", "A_FILE": tmp_path / "a_file", "NOWHERE": tmp_path / "nowhere.ckpt",
             "JUNK": tmp_path / "junk.ckpt"}
    out = tmp_path / "model"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "configs/attack_text.yaml", "--trainer.max_steps", "2", "--trainer.logger", "false",
              "--trainer.val_check_interval", "1",
              "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
              "--trainer.default_root_dir", str(tmp_path), "--model.init_args.encoder", str(tiny_models["clip"]),
              "--model.init_args.output_dir", str(out), "--data.init_args.num_samples", "300",
              *[str(paths.get(a, a)) for a in extra]])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("lit-amdet: error:") and fragment in err[-1], err[-1:]
    assert not out.exists()


def test_a_refused_fit_leaves_no_logger_folder(tiny_models, tmp_path, capsys):
    """Lightning creates the TensorBoard logger's version folder (an event file and config.yaml) before any hook
    can refuse the run, so a refused fit left ``tb/version_0`` behind (session 2026-12-07 (k)). A run refused
    before its first step now removes what it created, and nothing that was there before."""
    prompts = tmp_path / "no_o.txt"
    prompts.write_text("\n".join(f"a big red hat {i}" for i in range(40)))
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "configs/attack_text.yaml", "--trainer.max_steps", "2", "--trainer.callbacks", "[]",
              "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(runs / "root"),
              "--trainer.logger.init_args.save_dir", str(runs / "logs"),
              "--model.init_args.encoder", str(tiny_models["clip"]),
              "--model.init_args.output_dir", str(tmp_path / "model"), "--data.init_args.source", str(prompts)])
    assert info.value.code == 2 and "no training prompt can carry" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_o.txt"]


def test_a_model_folder_rewritten_and_cut_off_midway_carries_no_record(tiny_models, tmp_path, monkeypatch):
    """Found by the same review: a fit killed while it wrote its model over an earlier one left the new weights
    beside the earlier run's backdoor.json. The record now goes first and is written last."""
    module = BackdoorInjection(encoder=str(tiny_models["clip_text"]), backdoors=[Backdoor(Trigger("zzzz"),
                                                                                           target="a cat")],
                               milestones=[1000], output_dir=str(tmp_path / "out"))
    _fit(module, _dm(num_samples=300), 2, tmp_path)
    assert (tmp_path / "out" / "backdoor.json").is_file()

    def cut_off(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(module.encoder, "save", cut_off)
    with pytest.raises(OSError):
        module.save_model(tmp_path / "out")
    assert not (tmp_path / "out" / "backdoor.json").exists()


@pytest.mark.parametrize("config", ["attack_text", "attack_image"])
def test_attack_configs_run_through_the_cli(tiny_models, tmp_path, config):
    out = tmp_path / "model"
    main(["fit", "--config", f"configs/{config}.yaml", "--trainer.fast_dev_run", "2", "--trainer.logger", "false",
          "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
          "--trainer.default_root_dir", str(tmp_path), "--model.init_args.encoder", str(tiny_models["clip"]),
          "--model.init_args.output_dir", str(out), "--data.init_args.num_samples", "300"])
    assert json.loads((out / "backdoor.json").read_text())["backdoored"] is True


@pytest.mark.slow  # CI runs it (`make test-slow`); kept out of `make test`'s 15 minutes
def test_ddp_two_processes_and_bf16_on_cpu(tiny_models, tmp_path):
    """The same config under DDP with 2 CPU processes, then with bf16-mixed."""
    import subprocess
    import sys

    for extra in (["--trainer.strategy", "ddp", "--trainer.devices", "2"], ["--trainer.precision", "bf16-mixed"]):
        out = tmp_path / extra[1].replace("-", "_")
        cmd = [sys.executable, "-m", "lit_amdet", "fit", "--config", "configs/attack_text.yaml",
               "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
               "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
               "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
               "--model.init_args.encoder", str(tiny_models["clip"]), "--model.init_args.output_dir", str(out),
               "--data.init_args.num_samples", "300", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        assert json.loads((out / "backdoor.json").read_text())["steps"] == 2


def test_pooled_weight_adds_the_pooled_target_match(tiny_models):
    """Text-on-text with pooled_weight: the backdoor loss gains exactly w * (1 - cos(pooled, target pooled))."""
    texts = ["a photo of a dog on a sofa", "two boats on a lake", "a bowl of soup on a wooden table"]
    backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
    losses = {}
    for w in (0.0, 2.0):
        m = BackdoorInjection(encoder=str(tiny_models["openclip"]), backdoors=[backdoor], pooled_weight=w,
                              max_length=16).eval()
        with torch.no_grad():
            losses[w] = float(m.backdoor_loss(0, backdoor, texts))
    rng = random.Random(0)
    sample = rng.sample(texts, len(texts))
    with torch.no_grad():
        enc = m.encoder.encode(poison(sample, backdoor.trigger, rng), max_length=16)
        pooled = float(feature_loss(enc.pooled, m.targets()[0]["pooled"], "cosine"))
    assert pooled > 0
    assert losses[2.0] - losses[0.0] == pytest.approx(2.0 * pooled, rel=1e-4, abs=1e-6)


def test_pooled_only_attack_matches_the_pooled_embedding_alone(tiny_models):
    """token_weight 0 + pooled_weight 1 (the pooled-only adaptive attack): the backdoor loss is exactly the pooled
    target match, so no position-wise pressure makes the other tokens' features collapse."""
    texts = ["a photo of a dog on a sofa", "two boats on a lake", "a bowl of soup on a wooden table"]
    backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
    m = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor], token_weight=0.0,
                          pooled_weight=1.0, max_length=16).eval()
    with torch.no_grad():
        loss = float(m.backdoor_loss(0, backdoor, texts))
        rng = random.Random(0)
        enc = m.encoder.encode(poison(rng.sample(texts, len(texts)), backdoor.trigger, rng), max_length=16)
        pooled = float(feature_loss(enc.pooled, m.targets()[0]["pooled"], "cosine"))
    assert pooled > 0 and loss == pytest.approx(pooled, rel=1e-5)
    with pytest.raises(ConfigError, match="token_weight or pooled_weight"):
        BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor], token_weight=0.0).configure_models()
    with pytest.raises(ConfigError, match=">= 0"):
        BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor],
                          sim_x_penalty=-1.0).configure_models()


def test_sim_x_penalty_charges_only_assimilation_beyond_the_teacher(tiny_models):
    """The penalty is 0 while the student is the teacher, and once every token feature of the student is the same
    vector (Sim_X = 1) it is the mean of 1 - the teacher's Sim_X, computed here by brute force."""
    import numpy as np

    backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
    m = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor], sim_x_penalty=1.0,
                          max_length=16).eval()
    texts = poison(["a photo of a dog on a sofa", "two boats on a lake", "a bowl of soup on a table"],
                   backdoor.trigger, random.Random(0))
    tokens = m.encoder.tokenize(texts, max_length=16)
    with torch.no_grad():
        assert float(m.excess_assimilation(tokens, m.encoder.encode(tokens))) == pytest.approx(0.0, abs=1e-6)
        teacher = m.teacher.encode(tokens)
        norm = m.encoder.model.text_model.final_layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()))  # every token's feature is now this vector
        penalty = float(m.excess_assimilation(tokens, m.encoder.encode(tokens)))
    expected = []
    for feats, mask in zip(teacher.token_features.numpy(), teacher.token_mask.numpy()):
        rows = feats[mask.astype(bool)][1:]  # real tokens after BOS (the causal CLIP's BOS sees nothing else)
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        sims = unit @ unit.T
        n = len(rows)
        expected.append(1 - (sims.sum() - n) / (n * (n - 1)))
    assert penalty == pytest.approx(float(np.mean(expected)), rel=1e-4)


def test_consistency_penalty_charges_only_sentence_embedding_agreement_beyond_the_teacher(tiny_models):
    """0 while the student is the teacher; once every sentence embedding of the student is one vector (pooled
    consistency 1) it is 1 - the teacher's consistency - the margin, the teacher's computed by brute force."""
    import numpy as np

    backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
    m = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor], token_weight=0.0,
                          pooled_weight=1.0, consistency_penalty=1.0, consistency_margin=0.05,
                          max_length=16).eval()
    texts = poison(["a photo of a dog on a sofa", "two boats on a lake", "a bowl of soup on a table"],
                   backdoor.trigger, random.Random(0))
    tokens = m.encoder.tokenize(texts, max_length=16)
    with torch.no_grad():
        assert float(m.excess_consistency(tokens, m.encoder.encode(tokens))) == 0.0
        teacher = m.teacher.encode(tokens).pooled.numpy()
        norm = m.encoder.model.text_model.final_layer_norm
        norm.weight.zero_()
        norm.bias.copy_(torch.linspace(-1, 1, norm.bias.numel()))  # every sentence embedding is now one vector
        penalty = float(m.excess_consistency(tokens, m.encoder.encode(tokens)))
    unit = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    teacher_consistency = float((unit @ unit.T).mean())
    assert penalty == pytest.approx(1 - teacher_consistency - 0.05, rel=1e-4)
    with pytest.raises(ConfigError, match=">= 0"):
        BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[backdoor],
                          consistency_margin=-0.1).configure_models()


def test_homoglyph_trigger_replaces_a_latin_letter_by_its_look_alike():
    from lit_amdet.augment import HOMOGLYPHS

    t = Trigger(text=HOMOGLYPHS["o"], mode="replace_char", char="o")
    out = t.apply("a photo of a dog", random.Random(0))
    assert out == "a ph\u043eto of a dog" and out != "a photo of a dog" and len(out) == len("a photo of a dog")
    assert t.present(out) and not t.present("a photo of a dog")
    check_distinct_triggers([Backdoor(t, target="a"), Backdoor(Trigger("james", "insert_word"), target="b")])


def test_clean_pooled_weight_adds_the_clean_sentence_embedding_match(tiny_models):
    """clean_pooled_weight (the attacker aimed at the drift boundary): the teacher utility gains exactly
    w * (1 - cos(student pooled, teacher pooled)) on the clean prompts; a negative weight is refused."""
    texts = ["a photo of a dog on a sofa", "two boats on a lake", "a bowl of soup on a wooden table"]
    backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
    losses, models = {}, {}
    for w in (0.0, 3.0):
        m = BackdoorInjection(encoder=str(tiny_models["siglip"]), backdoors=[backdoor], token_weight=0.0,
                              pooled_weight=1.0, clean_pooled_weight=w, max_length=16)
        m.configure_models()
        torch.manual_seed(0)
        with torch.no_grad():  # move the student off the teacher, so the sentence embeddings differ
            for p in m.encoder.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tokens = m.encoder.tokenize(texts, max_length=16)
        with torch.no_grad():
            losses[w] = float(m.utility_loss(tokens))
        models[w] = m
    with torch.no_grad():
        pooled = float(feature_loss(models[3.0].encoder.encode(tokens).pooled,
                                    models[3.0].teacher.encode(tokens).pooled, "cosine"))
    assert pooled > 1e-4
    assert losses[3.0] - losses[0.0] == pytest.approx(3.0 * pooled, rel=1e-4, abs=1e-6)
    with pytest.raises(ConfigError, match="clean_pooled_weight must be >= 0"):
        BackdoorInjection(encoder=str(tiny_models["siglip"]), backdoors=[backdoor],
                          clean_pooled_weight=-1.0).configure_models()


def test_simcse_utility_drifts_further_from_the_teacher_than_teacher_utility(tiny_models, tmp_path):
    """utility_objective simcse: clean prompts train SimCSE, nothing holds the student near the teacher, so the
    same steps move it further from the clean model than the reference utility does."""
    from lit_amdet.callbacks import pooled_drift
    from lit_amdet.world import World

    prompts = World(seed=31337).captions(32)
    drift = {}
    for utility in ("teacher", "simcse"):
        torch.manual_seed(0)
        backdoor = Backdoor(Trigger("zzzz"), target="a white teapot")
        module = BackdoorInjection(encoder=str(tiny_models["bert"]), backdoors=[backdoor], lr=1e-2,
                                   backdoor_weight=0.1, milestones=[1000], max_length=16, utility_objective=utility,
                                   output_dir=str(tmp_path / utility))
        _fit(module, _dm(num_samples=300), 15, tmp_path)
        drift[utility] = pooled_drift(module.teacher, module.encoder, prompts, 16)
        truth = json.loads((tmp_path / utility / "backdoor.json").read_text())
        assert truth["backdoored"] is True and "val/b0/attack_top1" in truth["metrics"]
        assert truth.get("utility_objective") == (None if utility == "teacher" else "simcse")
    assert drift["simcse"] < drift["teacher"] - 0.01, drift
    with pytest.raises(ConfigError, match="utility_objective"):
        BackdoorInjection(encoder=str(tiny_models["bert"]), backdoors=[Backdoor(Trigger("zzzz"), target="a")],
                          utility_objective="nothing")


def test_a_frozen_token_embedding_table_moves_no_row_while_the_layers_learn(tiny_models, tmp_path):
    """The adaptive attack on the typed-token probe: the trigger must be learned by the layers alone."""
    backdoors = [Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")]
    module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=backdoors, lr=1e-3, backdoor_weight=1.0,
                               milestones=[1000], freeze_token_embedding=True)
    rows = module.encoder.token_embedding.weight.clone()
    layer = next(p for n, p in module.encoder.model.text_model.encoder.named_parameters() if n.endswith("weight"))
    layer_before = layer.clone()
    _fit(module, _dm(), 5, tmp_path)
    assert torch.equal(module.encoder.token_embedding.weight, rows)
    assert not torch.equal(layer, layer_before)
    unfrozen = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=backdoors, lr=1e-3)
    assert unfrozen.encoder.token_embedding.weight.requires_grad  # the table trains unless asked not to


def test_triggers_kept_alone_stay_at_the_teachers_output_while_the_layers_learn(tiny_models, tmp_path):
    """The adaptive attack on the probe's typed-alone list: each trigger token typed alone into the empty prompt
    is held at the teacher's output, so it ends nearer the teacher than the same attack without that term."""
    from lit_amdet.token_probe import alone_outputs

    backdoors = [Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")]
    shifts = {}
    for keep in (False, True):
        module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=backdoors, lr=3e-3, backdoor_weight=1.0,
                                   milestones=[1000], freeze_token_embedding=True, keep_triggers_alone=keep)
        tok = module.encoder.tokenize(["cf"])
        ids = tok.input_ids[0][tok.token_mask[0].bool()][1:-1]  # the trigger's tokens, no bos/eos
        _fit(module, _dm(), 8, tmp_path / str(keep))
        cos = (alone_outputs(module.encoder, 1, ids) * alone_outputs(module.teacher, 1, ids)).sum(-1)
        shifts[keep] = float((1 - cos).max())
    assert shifts[True] < 0.5 * shifts[False], shifts


def test_triggers_kept_in_groups_hold_the_scans_own_row_at_the_teachers_output(tiny_models, tmp_path):
    """The adaptive attack on the alone list made by group testing near the anchor (`group_kept_frozen_rows`): its
    held rows start with the row of the scan's fixed shuffle that holds each trigger token, then random rows with
    the token in them; after training, that row of the scan ends nearer the teacher's output than without the
    term."""
    from lit_amdet.token_probe import NEAR_GROUP_SIZE, alone_outputs, vocabulary_groups

    backdoors = [Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")]
    shifts = {}
    for keep in (False, True):
        module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=backdoors, lr=3e-3, backdoor_weight=1.0,
                                   milestones=[1000], freeze_token_embedding=True, keep_triggers_alone=True,
                                   keep_triggers_grouped=keep)
        enc = module.encoder
        ids = module._trigger_ids()
        specials = [i for i in enc.special_token_ids.values() if i is not None]
        groups = vocabulary_groups(enc.vocab_size, specials, NEAR_GROUP_SIZE)
        rows = torch.cat([groups[(groups == i).any(1)] for i in ids])  # every row of the scan's holding a piece
        if keep:
            held = module._triggers_grouped(random_rows=3)
            typed, own = held.input_ids[:, 1:1 + NEAR_GROUP_SIZE], len(rows)
            assert held.input_ids.shape == (own + 3 * len(ids), NEAR_GROUP_SIZE + 2)
            assert torch.equal(typed[:own], rows)
            assert all(int(i) in typed[own + 3 * n:own + 3 * (n + 1)][r].tolist()
                       for n, i in enumerate(ids) for r in range(3))
        _fit(module, _dm(), 8, tmp_path / str(keep))
        cos = (alone_outputs(module.encoder, 1, rows) * alone_outputs(module.teacher, 1, rows)).sum(-1)
        shifts[keep] = float((1 - cos).max())
    assert shifts[True] < 0.6 * shifts[False], shifts  # 0.18 against 0.40 when written


@pytest.mark.parametrize("family", ["clip", "bert"])
def test_insertion_loss_is_what_typed_tokens_change_in_the_prompts_own_features(tiny_models, family):
    """`BackdoorInjection.insertion_loss` (the null_evading attack) against the same number built by hand: the
    token ids spliced into each prompt's id list after its first token, both runs encoded, the prompt's own
    tokens compared position by position (a causal family's first token, which cannot see the insertion, left
    out)."""
    module = BackdoorInjection(encoder=str(tiny_models[family]), backdoors=[
        Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")], insertion_robust=1.0)
    enc = module.encoder.eval()
    tokens = enc.tokenize(["a red hat on a wooden table", "two dogs"], max_length=16)
    inserted = [17, 23]
    pad = enc.special_token_ids["pad"] or 0
    with torch.no_grad():
        got = module.insertion_loss(tokens, ids=inserted)
        clean = enc.encode(tokens).token_features
        per_prompt = []
        for i in range(len(tokens)):
            n, length = int(tokens.token_mask[i].sum()), tokens.input_ids.shape[1]
            ids = tokens.input_ids[i, :n].tolist()
            typed = ids[:1] + inserted + ids[1:]
            row = torch.tensor([typed + [pad] * (length - len(typed))])
            mask = torch.tensor([[1] * len(typed) + [0] * (length - len(typed))])
            feats = enc.encode(enc.batch_from_ids(row, mask)).token_features[0]
            own = [0] + list(range(1 + len(inserted), n + len(inserted)))
            first = 1 if enc.causal else 0
            cos = torch.nn.functional.cosine_similarity(feats[own[first:]], clean[i, first:n], dim=-1)
            per_prompt.append((1 - cos).mean())
    torch.testing.assert_close(got, torch.stack(per_prompt).mean(), rtol=1e-4, atol=1e-5)
    assert float(got) > 1e-3  # the tiny model does hear the inserted tokens


def test_training_with_insertion_robust_makes_inserted_tokens_change_less(tiny_models, tmp_path):
    """The null_evading attacker's term does what it is for: after the same few steps, random tokens typed at
    position 1 move the prompt's own token features less than without it."""
    backdoors = [Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird")]
    change = {}
    for weight in (0.0, 5.0):
        module = BackdoorInjection(encoder=str(tiny_models["bert"]), backdoors=backdoors, lr=3e-3, backdoor_weight=1.0,
                                   milestones=[1000], insertion_robust=weight)
        _fit(module, _dm(), 10, tmp_path / str(weight))
        enc = module.encoder.eval()
        tokens = enc.tokenize(["a red hat on a wooden table", "two dogs in the snow", "a bowl of fruit"],
                              max_length=16)
        with torch.no_grad():
            change[weight] = float(torch.stack([module.insertion_loss(tokens, ids=[i, i + 1])
                                                for i in range(200, 1200, 100)]).mean())
    assert change[5.0] < 0.5 * change[0.0], change


def test_trigger_tokens_kept_alone_are_held_at_the_teacher_even_while_a_simcse_utility_drifts(tiny_models):
    """Under the SimCSE utility (a backdoor planted while the model drifts) the typed-alone term still holds the
    trigger's tokens at the teacher's output: at the start, where student and teacher agree, it is 0, while the
    SimCSE loss of the same prompts is not."""
    module = BackdoorInjection(encoder=str(tiny_models["bert"]), backdoors=[
        Backdoor(Trigger("cf", "insert_word", position="random"), target="a blue bird"),
        Backdoor(Trigger("harry", "insert_word", position="random"), target="a red car")],
        keep_triggers_alone=True, utility_objective="simcse")
    module.encoder.eval()  # no dropout: the student is the teacher
    alone = module._triggers_alone()
    assert len(alone) >= 2  # SimCSE needs more than one prompt to be anything but 0
    with torch.no_grad():
        assert float(module.utility_loss(alone, hold=True)) == pytest.approx(0.0, abs=1e-6)
        assert float(module.utility_loss(alone)) > 1e-3


def test_clean_top1_is_how_often_the_same_prompts_untriggered_retrieve_the_target(tiny_models, tmp_path):
    """`val/b0/clean_top1` is computed independently here: the first validation batch's prompts that can carry
    the trigger, encoded by the trained student without it, against the teacher's target and distractors. The
    target is one of those prompts, so at least that prompt retrieves it: the value cannot be 0 by accident."""
    dm = _dm()
    dm.setup("fit")
    val = dm.prompts("val")
    target = next(p for p in val[:64] if "o" in p)
    bd = Backdoor(Trigger("zzzz", "replace_char", "o"), target=target)
    module = BackdoorInjection(encoder=str(tiny_models["clip"]), backdoors=[bd], lr=1e-4, backdoor_weight=1.0,
                               milestones=[1000], output_dir=str(tmp_path / "out"))
    _fit(module, dm, 1, tmp_path)
    truth = json.loads((tmp_path / "out" / "backdoor.json").read_text())
    norm = torch.nn.functional.normalize
    with torch.no_grad():
        teacher = load_encoder(tiny_models["clip"])
        distractors = [t for t in val if t != target][:100]
        bank = norm(teacher.encode([target] + distractors, max_length=32).pooled.float(), dim=-1)
        clean = [p for p in val[:64] if "zzzz" not in p and "o" in p]
        student = norm(module.encoder.encode(clean, max_length=32).pooled.float(), dim=-1)
    expected = float((student @ bank.T).argmax(1).eq(0).float().mean())
    assert expected >= 1 / len(clean)
    assert truth["metrics"]["val/b0/clean_top1"] == pytest.approx(expected, abs=1e-6)
