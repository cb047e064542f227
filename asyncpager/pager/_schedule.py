"""The decode schedule: the order in which layers are walked, token after token.

Pure bookkeeping, no I/O. ``cursor`` is the schedule position of the layer acquired
most recently; ``distance(layer)`` is how many steps ahead its next use is (1 = next,
``len(order)`` = the layer just used), the quantity Belady's policy ranks by.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence

__all__ = ["NEVER", "Schedule"]

#: Distance of a tensor outside the schedule: it is evicted before any scheduled one.
NEVER = 1 << 62


class Schedule:
    __slots__ = ("_cursor", "_n", "_order", "_positions")

    def __init__(self, order: Iterable[int]) -> None:
        self._order: tuple[int, ...] = tuple(int(x) for x in order)
        self._n = len(self._order)
        self._positions: dict[int, list[int]] = {}
        for pos, layer in enumerate(self._order):
            self._positions.setdefault(layer, []).append(pos)
        self._cursor = self._n - 1  # before the first step, the next use is position 0

    @property
    def order(self) -> tuple[int, ...]:
        return self._order

    @property
    def cursor(self) -> int:
        return self._cursor

    def __contains__(self, layer: object) -> bool:
        return layer in self._positions

    def __len__(self) -> int:
        return self._n

    def advance_to(self, layer: int) -> bool:
        """Move the cursor to ``layer``'s next occurrence (wrapping). Returns False,
        changing nothing, when the layer is not in the schedule or already current."""
        positions = self._positions.get(layer)
        if positions is None or (self._order[self._cursor] == layer and self._n):
            return False
        self._cursor = min(positions, key=lambda q: (q - self._cursor - 1) % self._n)
        return True

    def distance(self, layer: int | None) -> int:
        """Steps from the cursor to ``layer``'s next use: 1..len, or NEVER."""
        if layer is None:
            return NEVER
        positions = self._positions.get(layer)
        if positions is None:
            return NEVER
        # The next use is the first position after the cursor, wrapping: O(log k).
        i = bisect_right(positions, self._cursor)
        q = positions[i] if i < len(positions) else positions[0]
        return (q - self._cursor - 1) % self._n + 1

    def upcoming(self, depth: int) -> list[int]:
        """The distinct layers of the next ``depth`` steps, nearest first."""
        seen: list[int] = []
        for k in range(1, min(depth, self._n) + 1):
            layer = self._order[(self._cursor + k) % self._n]
            if layer not in seen:
                seen.append(layer)
        return seen

    def by_distance_desc(self, layers: Sequence[int]) -> list[int]:
        return sorted(layers, key=self.distance, reverse=True)
