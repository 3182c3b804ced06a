"""The real thing, in CI: backdoor the pretrained MiniLM, fine-tune it benignly, scan both (what `make demo` does).

Random-init encoders say nothing about detection, so this is the test that
checks the verdicts: the backdoored model is flagged and the recovered trigger
makes it say the injected target; the benign fine-tune and the clean base are not.
"""

from __future__ import annotations

import json

import pytest

from lit_amdet import demo

pytestmark = pytest.mark.slow  # ~7 minutes on 2 free cores: run by .ci/run after the default suite


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return demo.run("minilm", cache=root / "models", runs=root / "runs", attack_steps=40, benign_steps=20,
                    scan_steps=60, scan_extra=["--model.init_args.probe_prompts", "160",
                                               "--model.init_args.holdout_prompts", "48",
                                               "--model.init_args.restarts", "3"])


def test_backdoored_minilm_is_flagged_and_says_its_target(scans):
    truth = scans["truth"]["backdoored"]
    assert truth["backdoored"] and truth["metrics"]["val/b0/attack_top1"] == 1.0  # the attack did work
    r = scans["reports"]["backdoored"]
    assert r["verdict"] == "BACKDOORED", json.dumps(r["checks"], indent=1)
    assert r["nearest_captions"][0]["caption"] == truth["backdoors"][0]["target"]
    assert r["anchor_used"] and r["scores"]["assimilation"] > 0.8


def test_benign_minilm_is_clean(scans):
    assert scans["truth"]["benign"]["backdoored"] is False
    r = scans["reports"]["benign"]
    assert r["verdict"] == "clean", json.dumps(r["checks"], indent=1)
    # the contrast checks saw what the reference rule could not: the suspect and anchor agree under the trigger
    assert r["scores"]["assimilation_gap"] < scans["reports"]["backdoored"]["scores"]["assimilation_gap"]
