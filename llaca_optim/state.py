"""``optimizer.state`` as dicts that count their changes, so that a step may reuse its plan.

A step's plan (``optim/plan.py``) holds the state tensors of every parameter in its buckets.
torch's optimizers read ``self.state`` afresh at every step, and code written for them relies on
that: it resets an optimizer with ``optimizer.state = defaultdict(dict)`` or
``optimizer.state.clear()``, drops one parameter's entry, or puts a new tensor under
``state[p]["exp_avg"]``. A reused plan would go on updating the old tensors, unseen. Checking
every entry and its values at every step would cost as much host time as the reused plan saves;
so the optimizer's state map and its entries are dicts that bump one shared counter whenever they
change, and a plan is reused only while that counter and the map's identity are what they were
when it was made.

Reads are plain dict reads (no method here is on the read path). The counting types never leave
the optimizer: pickling or deep-copying them gives a plain ``defaultdict(dict)`` of plain dicts
(a shallow copy, a plain ``defaultdict`` of the same entries), and state dicts hold plain dicts,
so they load without this module. A map or entry that the user puts in
place of ours is adopted at the next step: its contents move into counting dicts (new dict
objects; the tensors are the same), because a plain dict cannot tell us when it changes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


class _Changes:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class _Counting:
    """Bumps ``self._changes.count`` before every mutation of the dict it is mixed into."""

    __slots__ = ()
    _changes: _Changes

    def __setitem__(self, key: Any, value: Any) -> None:
        self._changes.count += 1
        super().__setitem__(key, value)  # type: ignore[misc]

    def __delitem__(self, key: Any) -> None:
        self._changes.count += 1
        super().__delitem__(key)  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        self._changes.count += 1
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self._changes.count += 1
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self._changes.count += 1
        super().clear()  # type: ignore[misc]

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._changes.count += 1
        super().update(*args, **kwargs)  # type: ignore[misc]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:  # type: ignore[operator]
            self._changes.count += 1
        return super().setdefault(key, default)  # type: ignore[misc]

    def __ior__(self, other: Any) -> Any:
        self.update(other)
        return self


class StateEntry(_Counting, dict):
    """One parameter's state."""

    __slots__ = ("_changes",)

    def __init__(self, changes: _Changes, items: Any = ()) -> None:
        dict.__init__(self, items)
        self._changes = changes

    def __reduce__(self) -> Any:
        return dict, (dict(self),)


class StateMap(_Counting, defaultdict):
    """``optimizer.state``: a ``defaultdict`` whose missing entries are counting entries."""

    __slots__ = ("_changes",)

    def __init__(self, entries: Any = ()) -> None:
        defaultdict.__init__(self, None)
        self._changes = _Changes()
        for param, entry in dict(entries).items():
            dict.__setitem__(self, param, self.adopt(entry))

    @property
    def changes(self) -> int:
        return self._changes.count

    def adopt(self, entry: Any) -> Any:
        """``entry`` if it counts into this map, else a counting copy of it (anything but a dict
        as given: torch's optimizers fail on such an entry too)."""
        if type(entry) is StateEntry and entry._changes is self._changes:
            return entry
        if isinstance(entry, dict):
            return StateEntry(self._changes, entry)
        return entry

    def adopt_all(self) -> None:
        """Makes every entry a counting one (entries the user assigned are plain dicts)."""
        for param, entry in list(self.items()):
            adopted = self.adopt(entry)
            if adopted is not entry:
                dict.__setitem__(self, param, adopted)
        self._changes.count += 1

    def __missing__(self, param: Any) -> StateEntry:
        entry = self[param] = StateEntry(self._changes)
        return entry

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"

    def __reduce__(self) -> Any:
        return defaultdict, (dict, dict(self))

    # defaultdict's own copy and | build type(self)(factory, items), which this __init__ does not
    # take; a copy is a plain defaultdict, as pickling gives.
    def copy(self) -> Any:
        return defaultdict(dict, self)

    __copy__ = copy

    def __or__(self, other: Any) -> Any:
        return self.copy() | other

    def __ror__(self, other: Any) -> Any:
        return defaultdict(dict, other) | self.copy()


def counting(state: Any) -> StateMap:
    """``state`` itself if it is a map made by this module, else a counting map of its entries."""
    if type(state) is StateMap:
        state.adopt_all()
        return state
    return StateMap(state)
