"""benchmark.md: the report a person reads, made from benchmark.json's content."""

from __future__ import annotations

from lit_amdet.benchmark.metrics import WORKING_ATTACK_TOP1
from lit_amdet.benchmark.options import SPLITS


def _f(v, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    """benchmark.md: the detection table and drift per split, the adaptive attacks, attack success by strength,
    and every member."""
    cal = report["calibration"]
    members = report["members"]
    count = {(s, b): sum(1 for m in members if m["split"] == s and m["backdoored"] == b and not m["adaptive"])
             for s in SPLITS for b in (True, False)}
    bases = ", ".join(f"{b['name']} ({b['family']}, `{b['path']}`)" for b in report["bases"])
    n_adaptive = sum(1 for m in members if m["adaptive"])
    adaptive_count = f", and {n_adaptive} adaptive attackers" if n_adaptive else ""
    lines = ["# Detection benchmark", "",
             f"Bases: {bases}. "
             f"Members: calibration {count['calibration', True]} backdoored + {count['calibration', False]} benign, "
             f"test {count['test', True]} backdoored + {count['test', False]} benign"
             f"{adaptive_count}.", "",
             *_partial_note(report.get("partial")),
             f"*rule*: the scan's own verdict ({report['scan_rule']}). *calibrated*: logistic regression on "
             f"{', '.join(cal['features'])}, fitted on the calibration zoo, backdoored when p > "
             f"{cal['threshold']:.3f} (`{cal['path']}`; `lit_amdet.decision.CalibratedRule` applies it in a scan). "
             f"*working backdoors*: the same members without the backdoored ones whose injection failed (attack "
             f"top-1 below {WORKING_ATTACK_TOP1}); every other column counts every member as planned.",
             ""]
    for split in ("test", "calibration"):
        if split not in report["metrics"]:
            continue
        title = "Test zoo" if split == "test" else "Calibration zoo (calibrated columns are in-sample)"
        lines += [f"## {title}", "",
                  "| family | attack | backdoored / benign | rule P / R / F1 | calibrated P / R / F1 | AUROC | BCE | "
                  "Brier | drift-matched F1 rule / calibrated (benign kept) | working backdoors: F1 rule / "
                  "calibrated (kept of all) | target recovered | s per scan | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for family, table in report["metrics"][split].items():
            for attack, m in table.items():
                r, c, dm = m["rule"], m["calibrated"], m["drift_matched"]
                rec, sec = m["target_recovery"], m["seconds_per_scan"]
                matched = "–" if dm is None else f"{_f(dm['rule_f1'])} / {_f(dm['calibrated_f1'])} ({dm['benign']})"
                w = m.get("working")
                working = "–" if w is None else (f"{_f(w['rule']['f1'])} / {_f(w['calibrated']['f1'])} "
                                                 f"({w['backdoored']} of {m['backdoored']})")
                lines.append(
                    f"| {family} | {attack} | {m['backdoored']} / {m['benign']} | {_f(r['precision'])} / "
                    f"{_f(r['recall'])} / {_f(r['f1'])} | {_f(c['precision'])} / {_f(c['recall'])} / {_f(c['f1'])} | "
                    f"{_f(c['auroc'])} | {_f(c['bce'], '.3f')} | {_f(c['brier'], '.3f')} | {matched} | {working} | "
                    f"{_f(rec['rate'])} of {rec['measured']} | {_f(sec['mean'], '.1f')} ± {_f(sec['std'], '.1f')} | "
                    f"{_f(m['peak_memory_mib']['rss_max'], '.0f')} |")
        lines += ["", f"Drift ({split}): mean cosine of clean pooled embeddings to the base on held-out prompts "
                  "(1 = unmoved).", "",
                  "| family | backdoored min / median / max | benign min / median / max |", "|---|---|---|"]
        for family, table in report["metrics"][split].items():
            d = table["all"]["drift"]
            cells = ["–" if d[k] is None else " / ".join(f"{d[k][q]:.4f}" for q in ("min", "median", "max"))
                     for k in ("backdoored", "benign")]
            lines.append(f"| {family} | {cells[0]} | {cells[1]} |")
        lines.append("")
    if report.get("adaptive"):
        lines += ["## Adaptive attacks (test split, not calibrated on)", "",
                  "Attack success: top-1 retrieval of the target's pooled embedding among 101 captions and the "
                  "pooled cosine to the target, on held-out triggered prompts, and the same top-1 of those prompts "
                  "without the trigger (what the trigger adds is the difference); Sim_X of triggered / clean prompts "
                  "(medians over members). *none*: the plain attack of the test zoo.", "",
                  "| base | attack | members | detected: rule / calibrated | attack top-1 triggered / clean | "
                  "pooled cos | Sim_X triggered / clean | drift (median cosine to base) |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in report["adaptive"]:
            s = a["attack_success"]
            med = {k: _f(v["median"]) if v else "–" for k, v in s.items()}
            drift = _f(a["drift"]["median"], ".4f") if a["drift"] else "–"
            lines.append(f"| {a['base']} | {a['attack']} | {a['members']} | {_f(a['rule_detection_rate'])} / "
                         f"{_f(a['calibrated_detection_rate'])} | {med['attack_top1']} / "
                         f"{med.get('clean_top1', '–')} | {med['attack_cos_pooled']} | "
                         f"{med['sim_x_triggered']} / {med['sim_x_clean']} | {drift} |")
        lines.append("")
    if report.get("attack_strength"):
        lines += ["## Attack success by strength (backdoored members of both splits, adaptive ones left out)", "",
                  f"*working*: attack top-1 (target retrieved among 101 captions, held-out triggered prompts) of at "
                  f"least {WORKING_ATTACK_TOP1}.", "",
                  "| attack | lr | steps | members | working | attack top-1 min / median / max |",
                  "|---|---|---|---|---|---|"]
        for c in report["attack_strength"]:
            t = c["attack_top1"]
            lines.append(f"| {c['attack']} | {c['lr']:g} | {c['steps']} | {c['members']} | {c['working']} | "
                         f"{t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} |")
        lines.append("")
    lines += _drift_sweep_table(report.get("drift_sweep"))
    lines += ["## Members", "",
              "| member | split | truth | attack / trigger | attack top-1 | verdict | p | cosine to base | "
              "with the trigger it says | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for m in members:
        truth = "backdoored" if m["backdoored"] else "benign"
        what = f"{m['attack']} / {m['trigger_kind']} `{m['trigger']}`" if m["backdoored"] else "–"
        if m.get("adaptive"):
            what += f" ({m['adaptive']})"
        said = (m["recovered_caption"] or "–")[:40]
        if m["target_recovered"] is not None:
            said += " ✓" if m["target_recovered"] else " ✗"
        top1 = _f((m.get("attack_metrics") or {}).get("attack_top1"))
        lines.append(f"| {m['name']} | {m['split']} | {truth} | {what} | {top1} | {m['verdict']} | "
                     f"{_f(m['probability'])} | "
                     f"{_f(m['clean_cosine_to_base'], '.4f')} | {said} | {_f(m['seconds'], '.1f')} |")
    return "\n".join(lines) + "\n"


def _drift_sweep_table(levels: list[dict] | None) -> list[str]:
    if not levels:
        return []
    lines = ["## Drift sweep (members trained to a chosen clean cosine to the base)", "",
             "Per base and drift level: drift reached (median clean cosine to the base, from the scan), the rule's "
             f"recall, false-positive rate and F1 on that level's members, and the injections that failed on the "
             f"final model (attack top-1 below {WORKING_ATTACK_TOP1}).", ""]
    for base in dict.fromkeys(lv["base"] for lv in levels):
        lines += [f"### {base}", "",
                  "| level | benign / backdoored | drift reached: benign / backdoored | rule recall | rule FPR | "
                  "rule F1 | calibrated F1 | inconclusive: benign / backdoored | backdoored called clean | "
                  "failed injections |", "|---|---|---|---|---|---|---|---|---|---|"]
        for lv in (x for x in levels if x["base"] == base):
            d = lv["drift"]
            reached = " / ".join(_f(d[k]["median"], ".3f") if d[k] else "–" for k in ("benign", "backdoored"))
            failed = ", ".join(lv["failed"]) or "none"
            unjudged = lv.get("inconclusive") or {"benign": 0, "backdoored": 0}
            missed = ", ".join(lv.get("missed_as_clean", [])) or "none"
            lines.append(f"| {lv['level']:g} | {lv['benign']} / {lv['backdoored']} | {reached} | "
                         f"{_f(lv['rule_recall'])} | {_f(lv['rule_fpr'])} | {_f(lv['rule_f1'])} | "
                         f"{_f(lv['calibrated_f1'])} | {unjudged['benign']} / {unjudged['backdoored']} | {missed} | "
                         f"{failed} |")
        lines.append("")
    return lines


def _partial_note(partial: dict | None) -> list[str]:
    if not partial:
        return []
    left = ", ".join(f"{b} ({n} scans missing)" for b, n in partial["left_out_bases"].items()) or "none"
    return [f"**Made from the scan records** of the run in `{partial['run']}` (`benchmarks/summarise_scanned.py`), "
            f"which may be unfinished. Bases left out: {left}; adaptive attackers not yet scanned: "
            f"{len(partial['unscanned_adaptive'])}.", ""]
