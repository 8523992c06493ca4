"""Which produced messages are settled, for commits that do not wait.

A joiner may commit an input offset only once every example and dead
letter produced for the messages before it is delivered (or, failing that,
handled: sent again, or dead-lettered and that delivered). Waiting for the
producer to empty (`flush`) before each commit holds the joiner for a
linger and a round trip per commit. `DeliveryMarks` lets it commit later
instead: each top-level send opens a token (increasing), every produce call
made for it (the first, a retry, the halves of a group refused as too
large, the dead letters of what could not be delivered) holds it, and each
delivery report settles one hold. `mark()` taken after a commit point's
messages were produced is settled once every token below it is: those
offsets may then be committed, with nothing waited for.
"""

from __future__ import annotations


class DeliveryMarks:
    def __init__(self):
        self._next = 0
        self._holds: dict[int, int] = {}  # token -> produce calls in flight under it
        self._low = 0                     # every token below is settled

    def open(self) -> int:
        """A new token, held once (settle it once its first produce call is reported)."""
        token = self._next
        self._next += 1
        self._holds[token] = 1
        return token

    def take(self, token: int | None) -> int:
        """The token a produce call holds: a new one (`token` None), or
        `token` held once more (a retry, a half, a dead letter of its sends)."""
        if token is None:
            return self.open()
        self.hold(token)
        return token

    def hold(self, token: int) -> None:
        """One more produce call in flight under `token` (still open)."""
        self._holds[token] += 1

    def settle(self, token: int) -> None:
        left = self._holds[token] - 1
        if left:
            self._holds[token] = left
        else:
            del self._holds[token]

    def mark(self) -> int:
        """A mark covering every token opened so far."""
        return self._next

    def settled(self, mark: int) -> bool:
        """Whether every token below `mark` is settled."""
        while self._low < self._next and self._low not in self._holds:
            self._low += 1
        return self._low >= mark

    @property
    def in_flight(self) -> int:
        """Tokens not yet settled."""
        return len(self._holds)
