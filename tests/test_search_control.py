"""When the search stops (`lit_amdet.search_control.SearchControl`), from the checks a search measured."""

from __future__ import annotations

import torch

from lit_amdet.search_control import BENIGN_STOP, SearchControl


def test_the_benign_stop_drops_restarts_that_cannot_reach_the_rule_and_holds_their_triggers():
    """A climbing restart stays, a flat and a falling one are dropped; their triggers then stay where they were
    whatever the optimiser does, and the search stops once none is left."""
    control = SearchControl(restarts=3, check_every=10, max_steps=100)
    control.start([0.0, 0.0, 0.0])
    loss = [0.0, 0.0, 0.0]
    assert control.check(10, loss, passed=False, flagged=set(), progress=[0.5, 0.05, 0.02]) is None
    assert control.active == [0, 1, 2]  # never before two checks
    # step 20, 8 checks left: 0.9 + 8 * 2 * 0.4 >= 1; 0.06 + 16 * 0.05 = 0.86; 0.01 + 16 * 0.02 = 0.33
    assert control.check(20, loss, passed=False, flagged=set(), progress=[0.9, 0.06, 0.01]) is None
    assert control.active == [0] and control.dropped == {1: 20, 2: 20}
    vectors = torch.randn(3, 1, 4)
    control.hold(vectors)
    held = vectors.clone()
    vectors.add_(1.0)  # an optimiser step: momentum and weight decay move every row
    control.restore(vectors)
    assert torch.equal(vectors[1:], held[1:]) and torch.equal(vectors[0], held[0] + 1.0)
    assert control.progress[1] == [0.0, 0.05, 0.06]  # a dropped restart's progress is no longer recorded
    control.check(30, loss, passed=False, flagged=set(), progress=[0.9, 0.0, 0.0])
    assert control.check(40, loss, passed=False, flagged=set(), progress=[0.9, 0.0, 0.0]) == BENIGN_STOP
    assert control.active == [] and control.dropped[0] == 40


def test_the_other_stops_come_first_and_a_rule_without_progress_has_no_benign_stop():
    control = SearchControl(restarts=2, check_every=10, max_steps=100, patience=2)
    control.start([None, None])  # a rule without a progress measure
    assert control.check(10, [1.0, 1.0], passed=False, flagged={1}, progress=[None, None]) is None
    # flagged at two checks in a row: decided
    assert control.check(20, [0.5, 0.5], passed=False, flagged={1}, progress=[None, None]) == \
        "a restart flagged at two checks in a row"
    assert SearchControl(2, 10, 100).check(10, [0.0, 0.0], passed=True, flagged=set(), progress=[0.1, 0.1]) == \
        "trigger passed the checks"
    stall = SearchControl(restarts=2, check_every=10, max_steps=1000, patience=2, benign_stop=False)
    stall.start([0.0, 0.0])
    reasons = [stall.check(10 * i, [-1.0, -2.0], passed=False, flagged=set(), progress=[0.0, 0.0])
               for i in range(1, 4)]
    assert reasons == [None, None, "loss stalled"] and stall.active == [0, 1]  # benign stop off: none dropped
    # at the step limit itself nothing is dropped: the search simply ran its course
    last = SearchControl(restarts=1, check_every=10, max_steps=30)
    last.start([0.0])
    reasons = [last.check(step, [-p], passed=False, flagged=set(), progress=[p])
               for step, p in ((10, 0.3), (20, 0.5), (30, 0.6))]  # at 20: 0.5 + 1 * 2 * 0.3 >= 1, kept
    assert reasons == [None, None, None] and last.active == [0] and not last.dropped
    # no step limit to bound against: nothing is dropped
    free = SearchControl(restarts=1, check_every=10, max_steps=-1)
    free.start([0.0])
    for step in (10, 20, 30):
        assert free.check(step, [float(-step)], passed=False, flagged=set(), progress=[0.0]) is None
    assert free.active == [0]


def test_a_restart_kept_until_a_step_is_not_dropped_before_it():
    """``kept_until`` (the charged and null restarts' ``null_min_steps``): a flat restart survives the benign stop until
    that step, then is judged like the others."""
    control = SearchControl(restarts=2, check_every=10, max_steps=100, kept_until={1: 40})
    control.start([0.0, 0.0])
    flat = [0.01, 0.01]
    for step in (10, 20, 30):
        assert control.check(step, [0.0, 0.0], passed=False, flagged=set(), progress=flat) is None
    assert control.active == [1] and control.dropped == {0: 20}
    assert control.check(40, [0.0, 0.0], passed=False, flagged=set(), progress=flat) == BENIGN_STOP
    assert control.dropped[1] == 40


def test_a_yardstick_restart_never_keeps_the_search_going():
    """Once every judged restart is dropped the benign stop ends the search, whatever the yardsticks (the
    swapped restarts, which only measure the anchor) still could reach; `drop` takes a restart out at once."""
    control = SearchControl(3, check_every=10, max_steps=100, yardsticks=(2,))
    vectors = torch.randn(3, 1, 4)
    control.drop([2], step=0)
    control.hold(vectors)
    assert control.active == [0, 1] and control.dropped == {2: 0}
    moved = vectors + 1.0
    control.restore(moved)  # the dropped trigger is put back where it was dropped, the others move on
    torch.testing.assert_close(moved[2], vectors[2])
    torch.testing.assert_close(moved[:2], vectors[:2] + 1.0)
    control.start([0.0, 0.0, 0.0])
    flat = [0.0, 0.0, 0.0]
    assert control.check(10, [0.0] * 3, passed=False, flagged=set(), progress=flat) is None
    assert control.check(20, [0.0] * 3, passed=False, flagged=set(), progress=flat) == BENIGN_STOP
    # a yardstick still climbing does not hold the search once its judged restart is dropped
    kept = SearchControl(2, check_every=10, max_steps=100, yardsticks=(1,))
    kept.start([0.0, 0.0])
    assert kept.check(10, [0.0, 0.0], passed=False, flagged=set(), progress=[0.0, 0.3]) is None
    assert kept.check(20, [0.0, 0.0], passed=False, flagged=set(), progress=[0.0, 0.6]) == BENIGN_STOP
    assert kept.active == [1]
