"""The store's figures of one moment, counted in slices so that a storm never stalls the loop.

The lease table is a binary heap on the deadline, so the leases that have ended but still
wait for the reaper are its top: a walk goes down level by level, only under the ended
leases of the level above, filtering each level in C (about 100 ns a lease).  After a
storm of expiries a few hundred thousand may wait; counting them in one go would hold
every other connection for tens of milliseconds.  So a walk can stop after a number of
positions and go on at a later turn of the loop, over copies of the columns taken when it
first stopped (the table changes meanwhile): a census's figures are those of the moment
it began, the ended leases never among the living.
"""

from collections import Counter
from itertools import compress
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Optional, Tuple

if TYPE_CHECKING:
    from array import array

    Column = array[int]
else:
    Column = object

class EndedWalk:
    """Counts the table's leases whose deadline is not after ``now``, in steps."""

    def __init__(
        self,
        deadlines: Column,
        sizes: Column,
        tenants: Column,
        now: int,
        only_tenant: Optional[int],
    ) -> None:
        self._deadlines = deadlines
        self._sizes = sizes
        self._tenants = tenants
        self._due = now.__ge__
        self._only_tenant = only_tenant  # the one tenant with leases: sizes alone then say it
        self._counts: Counter[Any] = Counter()
        self._start, self._end = 0, 1  # the positions of the level being walked
        self._first = self._last = -1  # its ended positions so far, the first and the last
        self.done = not deadlines or deadlines[0] > now

    def step(self, budget: Optional[int] = None) -> bool:
        """Look at up to ``budget`` more positions (None: every one left); True once done."""
        deadlines = self._deadlines
        while not self.done:
            start, end = self._start, min(self._end, len(deadlines))
            stop = end if budget is None else min(end, start + budget)
            if stop <= start and start < end:
                return False  # the budget is spent
            mask = list(map(self._due, deadlines[start:stop]))
            if True in mask:
                keys: Iterable[Any] = self._sizes[start:stop]
                if self._only_tenant is None:
                    keys = zip(self._tenants[start:stop], keys)
                self._counts.update(compress(keys, mask))
                if self._first < 0:
                    self._first = start + mask.index(True)
                self._last = stop - 1 - mask[::-1].index(True)
            if budget is not None:
                budget -= stop - start
            if stop < end:
                self._start = stop
                continue
            if self._first < 0:  # nothing ended on this level, so nothing below it
                self.done = True
            else:  # a child of an ended lease may have ended too; no other may
                self._start, self._end = 2 * self._first + 1, 2 * self._last + 3
                self._first = self._last = -1
        return True

    def detach(self) -> None:
        """Go on over copies of the columns, so that the table may change before the next
        step: the count stays the one of the moment the walk began."""
        self._deadlines = self._deadlines[:]
        self._sizes = self._sizes[:]
        if self._only_tenant is None:
            self._tenants = self._tenants[:]

    def ended(self) -> "Counter[Tuple[int, int]]":
        """(tenant, size) -> the leases counted; the whole count once ``done``."""
        if self._only_tenant is None:
            return Counter(self._counts)
        return Counter({(self._only_tenant, size): n for size, n in self._counts.items()})


def living_usage(
    tenant: int,
    tenant_bytes: Dict[int, int],
    tenant_leases: Dict[int, int],
    ended: "Counter[Tuple[int, int]]",
    block: Callable[[int], int],
) -> Tuple[int, int]:
    """The block bytes and the number of living leases ``tenant`` holds: the table's
    figures less its leases that have ended (``block`` gives a lease size's block)."""
    blocks = tenant_bytes.get(tenant, 0)
    leases = tenant_leases.get(tenant, 0)
    for (owner, size), n in ended.items():
        if owner == tenant:
            blocks -= block(size) * n
            leases -= n
    return blocks, leases


class Census:
    """The store's figures at one moment (LeaseStore.census), the living leases among them
    known once ``step`` has walked every ended one."""

    def __init__(
        self,
        figures: Dict[str, int],
        tenant_bytes: Dict[int, int],
        tenant_leases: Dict[int, int],
        walk: EndedWalk,
        block: Callable[[int], int],
    ) -> None:
        self._figures = figures  # the table's: ended leases count as living, their blocks as held
        self._tenant_bytes = tenant_bytes
        self._tenant_leases = tenant_leases
        self._walk = walk
        self._block = block
        self._detached = False

    @property
    def done(self) -> bool:
        return self._walk.done

    def step(self, budget: Optional[int] = None) -> bool:
        """Walk on (see EndedWalk.step); the first step that stops short makes the census
        keep copies of what it still needs, so the store may change before the next."""
        if self._walk.step(budget):
            return True
        if not self._detached:
            self._detached = True
            self._walk.detach()
            self._tenant_bytes = dict(self._tenant_bytes)
            self._tenant_leases = dict(self._tenant_leases)
        return False

    def stats(self, tenant: Optional[int] = None) -> Dict[str, int]:
        """The figures, counting only living leases; ``tenant``'s own use too, if given."""
        assert self.done, "a census answers once it has walked every ended lease"
        ended = self._walk.ended()
        stats = dict(self._figures)
        stats["free_bytes"] += sum(self._block(size) * n for (_, size), n in ended.items())
        stats["live_leases"] -= sum(ended.values())
        if tenant is not None:
            stats["tenant_bytes"], stats["tenant_leases"] = living_usage(
                tenant, self._tenant_bytes, self._tenant_leases, ended, self._block
            )
        return stats
