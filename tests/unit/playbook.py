"""Drive a protocol state machine with events and assert the exact commands it answers with.

    assert (
        Playbook(machine)
        >> OutputWaiting(1, 3, 300)
        >> Tick(1_000)
        << PauseIngress()
        >> IngressPaused(cut_seq=7)
        << Freeze()
    )

``>> event`` feeds an event; the ``<< expected`` that follow it must be exactly the commands it
produced, in order: an event followed by no ``<<`` must produce none. An expected entry is a
command (compared with ==) or a command class (any instance matches, for commands whose text is
not the point of the test). A playbook can be extended and asserted again; only new steps run.
"""

from __future__ import annotations

from typing import Any, Protocol


class Machine(Protocol):
    def handle(self, event: Any) -> list[Any]: ...


class Playbook:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.steps: list[tuple[str, object]] = []
        # Everything the machine emitted so far, for checks across the whole run.
        self.commands: list[object] = []
        self._ran = 0
        self._transcript: list[str] = []

    def __rshift__(self, event: object) -> Playbook:
        self.steps.append((">>", event))
        return self

    def __lshift__(self, expected: object) -> Playbook:
        if not self.steps:
            raise ValueError("a playbook must start with an event")
        self.steps.append(("<<", expected))
        return self

    def __bool__(self) -> bool:
        self.run()
        return True

    def run(self) -> None:
        i = self._ran
        while i < len(self.steps):
            kind, event = self.steps[i]
            if kind != ">>":
                raise AssertionError(f"step {i}: expected {event!r} follows no event")
            i += 1
            expected: list[object] = []
            while i < len(self.steps) and self.steps[i][0] == "<<":
                expected.append(self.steps[i][1])
                i += 1
            got = self.machine.handle(event)
            self.commands.extend(got)
            self._transcript.append(f">> {event!r}")
            self._transcript.extend(f"<< {c!r}" for c in got)
            if not _matches(expected, got):
                raise AssertionError(
                    "playbook mismatch after the last event:\n"
                    + "\n".join(f"  {line}" for line in self._transcript[-12:])
                    + "\nexpected:\n"
                    + "\n".join(f"  << {_name(e)}" for e in expected)
                    + ("\n  (nothing)" if not expected else "")
                )
        self._ran = i


def _matches(expected: list[object], got: list[Any]) -> bool:
    if len(expected) != len(got):
        return False
    for want, have in zip(expected, got, strict=True):
        if isinstance(want, type):
            if not isinstance(have, want):
                return False
        elif want != have:
            return False
    return True


def _name(expected: object) -> str:
    return f"<any {expected.__name__}>" if isinstance(expected, type) else repr(expected)
