"""SIGINT and SIGTERM end a command at once, with no verdict, exit code 128 + the signal's number.

Left to themselves the two signals gave an interrupted scan a verdict's exit code. Lightning turns a
``KeyboardInterrupt`` (Ctrl+C) inside ``fit`` into ``sys.exit(1)``, which is `lit-amdet detect`'s code for
BACKDOORED; its own SIGTERM handler only sets a flag that the training loop reads between steps and then raises
``SIGTERMException``, a ``SystemExit`` with no code, so a scan stopped in its search exited 0, the code for clean,
and one stopped in its typed-token probe (``on_train_end``, where no loop reads the flag) ran on to the end. A
job scheduler's SIGTERM or a user's Ctrl+C must not read as a verdict.

`signals_stop` makes both signals raise `Interrupted` wherever the command is. It is a ``KeyboardInterrupt`` so
that Lightning takes its interrupt branch (callbacks told, the trainer torn down, the processes its launcher
started killed) and so that no ``except Exception`` in between can swallow it. Lightning then raises
``SystemExit(1)`` from inside its handler, so the `Interrupted` is that exit's ``__context__``: `interruption`
finds it there. Files are written whole or not at all (`lit_amdet.io`), so a stopped scan leaves no report.json,
and a screening of many suspects keeps the reports it finished (a rerun skips them).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

#: the signals that stop a command
STOPPING = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The command was stopped by ``signum``; no verdict."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process the signal ended (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


def _raise_interrupted(signum: int, _frame) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_stop() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise `Interrupted`; the previous handlers come back after it.

    Outside the main thread (where Python cannot set handlers) the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in STOPPING}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def interruption(exc: BaseException | None) -> Interrupted | None:
    """The `Interrupted` that ``exc`` is or was raised while handling (Lightning's ``sys.exit(1)``), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, Interrupted):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None
