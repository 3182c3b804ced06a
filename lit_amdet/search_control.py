"""When the AMDET search stops: plain Python beside `BackdoorDetection`, which feeds it each held-out check.

Four reasons to stop before the step limit, in this order:

- a restart passed the rule's search checks (`DecisionRule.search_passed`);
- a restart was flagged by the rule at two checks in a row (a pooled-path backdoor need not pass the search's
  same-target check, so it would otherwise run on: the verdict is already decided);
- the held-out loss stalled: no restart improved by ``stall_tol`` for ``patience`` checks;
- the benign stop: every restart has been dropped because the bound of `reachable` says it cannot be flagged
  by the step limit. A dropped restart's trigger is held where it was (`hold`, `restore`) and still counts in
  the verdict; the search runs the restarts still `active` only, so each drop also makes the steps cheaper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_amdet.amdet import reachable

BENIGN_STOP = "benign stop: no restart can reach the rule's thresholds by the step limit"


class SearchControl:
    """The stop decisions of one search over ``restarts`` restarts checked every ``check_every`` steps."""

    def __init__(self, restarts: int, check_every: int, max_steps: int | None, patience: int = 6,
                 stall_tol: float = 2e-3, benign_stop: bool = True, speedup: float = 2.0,
                 kept_until: dict[int, int] | None = None, yardsticks: tuple[int, ...] = ()) -> None:
        self.check_every, self.max_steps = check_every, max_steps
        self.yardsticks = set(yardsticks)  # restarts that measure the anchor: never what keeps the benign stop off
        self.patience, self.stall_tol = patience, stall_tol
        self.benign_stop, self.speedup = benign_stop, speedup
        self.kept_until = kept_until or {}  # restart -> the step before which the benign stop never drops it
        self.active = list(range(restarts))  # restarts still searched
        self.progress: list[list[float]] = []  # per restart: the rule's progress, random start then each check
        self.dropped: dict[int, int] = {}  # restart -> the step it was dropped at
        self._losses: list[list[float]] = []  # per check, every restart's held-out loss
        self._flagged: set[int] = set()  # restarts the rule flagged at the last check
        self._held: Tensor | None = None  # the dropped restarts' triggers (rows in _held_rows)
        self._held_rows: set[int] = set()

    def start(self, progress: list[float | None]) -> None:
        """Each restart's progress with its random initial trigger; a rule without a measure (None) turns the
        benign stop off."""
        self.progress = [] if None in progress else [[float(p)] for p in progress]

    def check(self, step: int, losses: list[float], passed: bool, flagged: set[int],
              progress: list[float | None]) -> str | None:
        """Record one held-out check (every restart's loss, progress and whether the rule flags it); the reason
        to stop the search now, or None."""
        settled, self._flagged = flagged & self._flagged, set(flagged)
        self._losses.append(list(losses))
        for r in self.active if self.progress else ():
            self.progress[r].append(float(progress[r]))
        if passed:
            return "trigger passed the checks"
        if settled:
            return "a restart flagged at two checks in a row"
        if self._stalled():
            return "loss stalled"
        if self.benign_stop:
            return self._drop_unreachable(step)
        return None

    def _stalled(self) -> bool:
        """No restart has improved its own held-out loss by ``stall_tol`` in the last ``patience`` checks.

        The yardsticks count here (unlike in the benign stop): a null still climbing is a null not yet measured,
        and stopping it early would understate it and tilt a drifted benign model towards a flag."""
        h, p = self._losses, self.patience
        return len(h) > p and all(min(c[r] for c in h[:-p]) - min(c[r] for c in h[-p:]) < self.stall_tol
                                  for r in range(len(h[-1])))

    def _drop_unreachable(self, step: int) -> str | None:
        if not self.max_steps or self.max_steps <= 0 or not self.progress:
            return None  # no step limit to bound against, or a rule without a progress measure
        left = -(-(self.max_steps - step) // self.check_every)  # checks still to come, the last one included
        if left <= 0:
            return None  # the step limit ends the search now: nothing is dropped, it simply ran its course
        self.drop([r for r in self.active if step >= self.kept_until.get(r, 0)
                   and not reachable(self.progress[r], left, speedup=self.speedup)], step)
        return None if set(self.active) - self.yardsticks else BENIGN_STOP

    def drop(self, restarts: list[int], step: int) -> None:
        """Stop searching ``restarts`` from ``step`` on (the benign stop's, or a yardstick the rule will not read);
        call `hold` next, so their triggers stay where they are."""
        for r in restarts:
            if r in self.active:
                self.active.remove(r)
                self.dropped[r] = step

    @torch.no_grad()
    def hold(self, vectors: Tensor) -> None:
        """Remember the triggers of the restarts dropped since the last call (``vectors``: [R, k, W])."""
        new = [r for r in self.dropped if r not in self._held_rows]
        if new:
            if self._held is None:
                self._held = vectors.detach().clone()
            self._held[new] = vectors.detach()[new]
            self._held_rows.update(new)

    @torch.no_grad()
    def restore(self, vectors: Tensor) -> None:
        """Put the dropped restarts' triggers back where they were dropped: the optimiser's momentum and weight
        decay move every row of the parameter, gradient or not."""
        if self._held_rows:
            rows = sorted(self._held_rows)
            vectors[rows] = self._held[rows].to(vectors.dtype)
