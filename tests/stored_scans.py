"""A stored benchmark scan for the scripts that judge scans again from their reports: a scan record in a ``scans/``
folder and the ``report.json`` it points at, with the search's scores and the typed probe's typings."""

from __future__ import annotations

import json
from pathlib import Path


def write_scan(folder: Path, name: str, backdoored: bool, search: dict, typings: list[dict]) -> None:
    """A record ``folder/name.json`` (a SigLIP test member) and its report beside ``folder``, called clean."""
    report = folder.parent / f"{name}-report.json"
    report.write_text(json.dumps({"verdict": "clean", "backdoored": False, "decided_by": "no path",
                                  "scores": {**search, "typed_token": typings[0]["token"]}, "typed_probe": typings}))
    (folder / f"{name}.json").write_text(json.dumps({"name": name, "base": "siglip", "split": "test",
                                                     "backdoored": backdoored, "report": str(report)}))
