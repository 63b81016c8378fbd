"""A buddy allocator over offsets: it hands out blocks of a pool, never touches the bytes.

Blocks are nodes of a tree with parent and child links, as in the C++ original.  A free
list per order (a dict keyed by offset) and a bit mask of the non-empty orders find a
block without walking the tree, so every operation costs O(log pool size).  A pool that
is not a power of two is split into power-of-two roots, largest first, so every block
stays aligned to its size and its buddy sits at ``offset ^ size``.

A million small leases mean a million leaves and as many split nodes, so a node holds
only its links: its offset and size follow from its path up to the ``RootSlot`` that
holds its root.  A leaf's state is its class: a free leaf and a leased one share one
layout, so granting a block switches its class instead of making an object.  Nodes the
tree drops have their upward links cut, so reference counting frees them at once and
the tree never leaves cycles for the garbage collector.

A saved pool's blocks come back all at once (``take_blocks``): the tree is built from
them a level at a time, in bulk, instead of by a claim per block.
"""

import gc
import sys
from bisect import bisect_left
from collections import deque
from itertools import chain, compress, repeat
from operator import and_, eq, lt, not_, or_, rshift, xor
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union


class RootSlot:
    """Holds one root of the tree, and knows where that root sits in the pool."""

    __slots__ = ("child", "offset", "order")

    def __init__(self, offset: int, order: int) -> None:
        self.offset = offset
        self.order = order
        self.child: Block = FreeBlock(self)


class Block:
    """A node of the tree: a power-of-two run of the pool.  Leaves have no children."""

    __slots__ = ("parent",)

    left: Optional["Block"] = None
    right: Optional["Block"] = None
    allocated = False

    def __init__(self, parent: "Parent") -> None:
        self.parent = parent

    def place(self) -> Tuple[int, int]:
        """The block's offset and order, read from its path up to the root."""
        path = depth = 0
        node: Block = self
        parent = self.parent
        while isinstance(parent, SplitBlock):
            if parent.right is node:
                path |= 1 << depth
            depth += 1
            node = parent
            parent = parent.parent
        if parent is None:
            raise ValueError("the block has left the tree")
        order = parent.order - depth
        return parent.offset + (path << order), order

    @property
    def offset(self) -> int:
        return self.place()[0]

    @property
    def size(self) -> int:
        return 1 << self.place()[1]

    def __repr__(self) -> str:
        if self.parent is None:
            return "%s(detached)" % type(self).__name__
        offset, order = self.place()
        return "%s(offset=%d, size=%d)" % (type(self).__name__, offset, 1 << order)


class FreeBlock(Block):
    """A leaf that is free: it sits on the free list of its order."""

    __slots__ = ()


class LeasedBlock(Block):
    """A leaf that is handed out."""

    __slots__ = ()
    allocated = True


class SplitBlock(Block):
    """A node split into two halves, its children."""

    __slots__ = ("left", "right")

    left: Block
    right: Block


Parent = Union[SplitBlock, RootSlot, None]  # None once a block has left the tree


def _merged(
    places: List[int], nodes: List[Block], more_places: List[int], more_nodes: List[Block]
) -> Tuple[List[int], List[Block]]:
    """Two ascending runs of nodes by offset as one; ValueError if two share an offset."""
    if not places:
        return more_places, more_nodes
    if len(more_places) <= _FEW:  # a few, as at the edge of a full region: put each in
        for place, node in zip(more_places, more_nodes):
            where = bisect_left(places, place)
            if where < len(places) and places[where] == place:
                raise ValueError("a block overlaps another")
            places.insert(where, place)
            nodes.insert(where, node)
        return places, nodes
    at = dict(zip(places, nodes))
    at.update(zip(more_places, more_nodes))
    if len(at) != len(places) + len(more_places):
        raise ValueError("a block overlaps another")
    merged = sorted(at)
    return merged, list(map(at.__getitem__, merged))


_FEW = 64  # more nodes than this are merged in by sorting, fewer one at a time


def _consume(items: Iterable[object]) -> None:
    """Run an iterator of calls to its end, in C."""
    deque(items, maxlen=0)


def _heap_bytes(instance: object) -> int:
    """What an object really occupies: its size rounded up to the allocator's 16 bytes."""
    return (sys.getsizeof(instance) + 15) & ~15


SPLIT_BYTES = _heap_bytes(SplitBlock(None))
LEAF_BYTES = _heap_bytes(FreeBlock(None))
OFFSET_KEY_BYTES = _heap_bytes(1 << 40)  # a free list's key, a boxed offset


class BuddyAllocator:
    """Allocates power-of-two blocks of at least ``min_block`` bytes from ``pool_size``."""

    def __init__(self, pool_size: int, min_block: int = 32) -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError("min_block must be a positive power of two")
        if pool_size < min_block:
            raise ValueError("the pool must hold at least one block of %d bytes" % min_block)
        self.pool_size = pool_size
        self.min_order = min_block.bit_length() - 1
        self._slots: List[RootSlot] = []
        self._free: List[Dict[int, Block]] = [{} for _ in range(pool_size.bit_length())]
        self._nonempty = 0  # bit k set <=> self._free[k] is not empty
        self.split_blocks = 0  # SplitBlock nodes in the tree now
        offset = 0
        for order in range(pool_size.bit_length() - 1, self.min_order - 1, -1):
            if pool_size & (1 << order):
                slot = RootSlot(offset, order)
                self._slots.append(slot)
                self._push(slot.child, order, offset)
                offset += 1 << order
        self.capacity = offset
        self._free_bytes = offset

    def take_blocks(self, offsets: Sequence[int], orders: Sequence[int]) -> None:
        """Allocate exactly these blocks, as if each were claimed, in an allocator that has
        none allocated: ``offsets`` ascending, ``orders`` beside them.

        It builds the tree and the free lists in one pass a level at a time, bottom up,
        in bulk (a million blocks in well under a second, where a million claims take
        seconds), and leaves no garbage behind.  ValueError if a block is misplaced,
        outside the pool or overlaps another; the allocator is then of no further use.
        """
        if self._free_bytes != self.capacity:
            raise ValueError("the allocator has blocks allocated already")
        if offsets:
            enabled = gc.isenabled()
            gc.disable()  # millions of new nodes, none of them garbage: no collection
            try:
                self._build(offsets, orders)
            finally:
                if enabled:
                    gc.enable()

    def _build(self, offsets: Sequence[int], orders: Sequence[int]) -> None:
        """take_blocks' work, level by level: the nodes of a level are its allocated
        blocks and the split nodes made below, in the order of their offsets; each one
        whose sibling is not among them gets a free leaf beside it; each pair gets its
        parent, a node of the level above.  A block that overlaps another meets a node
        at its own offset on its level."""
        if min(orders) < self.min_order:
            raise ValueError("a block is smaller than the least")
        leased = {
            order: list(compress(offsets, map(eq, orders, repeat(order)))) for order in set(orders)
        }
        new = object.__new__
        places: List[int] = []  # the offsets of the nodes at the level being built, ascending
        nodes: List[Block] = []  # the nodes there
        for level in range(self.min_order, self._slots[0].order + 1):
            size = 1 << level
            blocks = leased.pop(level, [])
            if blocks:
                if blocks[0] < 0 or any(map(and_, blocks, repeat(size - 1))):
                    raise ValueError("a block is misaligned, or before the pool")
                if not all(map(lt, blocks, blocks[1:])):
                    raise ValueError("blocks overlap, or are not in the order of their offsets")
                self._free_bytes -= size * len(blocks)
                leaves: List[Block] = list(map(new, repeat(LeasedBlock, len(blocks))))
                places, nodes = _merged(places, nodes, blocks, leaves)
            if not places:
                continue
            covered = sum(1 << slot.order for slot in self._slots if slot.order >= level)
            if places[-1] >= covered:
                raise ValueError("a block lies outside the pool's roots of its size")
            for slot in self._slots:
                if slot.order != level:
                    continue
                at = bisect_left(places, slot.offset)
                if at < len(places) and places[at] == slot.offset:  # the root holds a node
                    self._unlist(level, slot.offset)
                    node = nodes.pop(at)
                    del places[at]
                    node.parent = slot
                    slot.child = node
            if not places:
                continue
            count = len(places)
            if count % 2 or places[0] % (2 * size) or places[-1] - places[0] != (count - 1) * size:
                # Not one run of whole pairs (distinct, ascending multiples of ``size``
                # from the first to the last): find the nodes whose sibling is missing.
                parents_at = list(map(rshift, places, repeat(level + 1)))
                with_next = list(map(eq, parents_at, parents_at[1:]))
                with_next.append(False)
                paired = map(or_, with_next, chain((False,), with_next))
                free = list(map(xor, compress(places, map(not_, paired)), repeat(size)))
                leaves = list(map(new, repeat(FreeBlock, len(free))))
                self._free[level].update(zip(free, leaves))
                places, nodes = _merged(places, nodes, free, leaves)
            parents: List[Block] = list(map(new, repeat(SplitBlock, len(nodes) // 2)))
            _consume(map(setattr, parents, repeat("left"), nodes[0::2]))
            _consume(map(setattr, parents, repeat("right"), nodes[1::2]))
            _consume(
                map(setattr, nodes, repeat("parent"), chain.from_iterable(zip(parents, parents)))
            )
            self.split_blocks += len(parents)
            places, nodes = places[0::2], parents
        if places or leased:
            raise ValueError("a block is larger than the pool's roots")
        self._nonempty = sum(1 << order for order, free in enumerate(self._free) if free)

    @property
    def roots(self) -> List[Block]:
        return [slot.child for slot in self._slots]

    @property
    def free_bytes(self) -> int:
        return self._free_bytes

    @property
    def largest_free(self) -> int:
        """The largest request that would succeed now."""
        return 1 << (self._nonempty.bit_length() - 1) if self._nonempty else 0

    def order_for(self, size: int) -> int:
        """The order of the block that a request of ``size`` bytes gets."""
        return max((size - 1).bit_length(), self.min_order)

    def alloc(self, size: int) -> Optional[Block]:
        """A free block of at least ``size`` bytes, or None when nothing fits."""
        if size <= 0:
            raise ValueError("size must be positive")
        order = self.order_for(size)
        offset = self.take(order)
        return None if offset < 0 else self.block_at(offset, order)

    def free(self, block: Block) -> None:
        """Return a block; it merges with its buddy up the tree while both are free."""
        if not block.allocated:
            raise ValueError("%r is not allocated" % (block,))
        self.release(*block.place())

    def take(self, order: int) -> int:
        """The offset of a newly allocated block of ``2**order`` bytes, or -1."""
        candidates = self._nonempty >> order
        if not candidates:
            return -1
        found = order + (candidates & -candidates).bit_length() - 1
        free = self._free[found]
        offset, block = free.popitem()
        if not free:
            self._nonempty &= ~(1 << found)
        self._carve(block, found, offset, offset, order)
        return offset

    def claim(self, offset: int, order: int) -> bool:
        """Allocate exactly the block at ``offset``; False if any of it is taken or misplaced.

        Rebuilds the tree of a saved pool, one known block at a time.
        """
        size = 1 << order
        if order < self.min_order or offset < 0 or offset & (size - 1):
            return False
        slot = self._slot_for(offset)
        if slot is None or slot.order < order:
            return False
        node = slot.child
        level = slot.order
        base = slot.offset
        while not isinstance(node, FreeBlock):
            if level == order or not isinstance(node, SplitBlock):
                return False  # taken, or split below the block asked for
            level -= 1
            if offset & (1 << level):
                node = node.right
                base += 1 << level
            else:
                node = node.left
        self._unlist(level, base)
        self._carve(node, level, base, offset, order)
        return True

    def release(self, offset: int, order: int) -> None:
        """Free the allocated block at ``offset``, merging it up the tree with free buddies."""
        buddy = self._free[order].get(offset ^ (1 << order))
        if buddy is not None and isinstance(buddy.parent, SplitBlock):
            pair = buddy.parent  # a free buddy is a short way to the block: its sibling
            leaf = pair.left if pair.right is buddy else pair.right
        else:
            leaf = self.block_at(offset, order)
        if not leaf.allocated:
            raise ValueError("%r is not allocated" % (leaf,))
        leaf.__class__ = FreeBlock
        self._free_bytes += 1 << order
        node: Block = leaf
        parent = leaf.parent
        while isinstance(parent, SplitBlock):
            buddy = parent.left if parent.right is node else parent.right
            if not isinstance(buddy, FreeBlock):
                break
            self._unlist(order, offset ^ (1 << order))
            node.parent = buddy.parent = None  # no cycle is left behind
            node = parent
            parent = parent.parent
            order += 1
            offset &= -(1 << order)
            self.split_blocks -= 1
        if node is not leaf:
            merged = FreeBlock(parent)
            self._replace(node, merged)
            node.parent = None
            node = merged
        self._push(node, order, offset)

    def block_at(self, offset: int, order: int) -> Block:
        """The node for the block of ``2**order`` bytes at ``offset``, found from its root."""
        slot = self._slot_for(offset)
        if slot is not None and slot.order >= order:
            node: Optional[Block] = slot.child
            half = 1 << slot.order
            size = 1 << order
            while node is not None and half > size:
                half >>= 1
                node = node.right if offset & half else node.left
            if node is not None:
                return node
        raise ValueError("no block of %d bytes at offset %d" % (1 << order, offset))

    def free_runs(self) -> Iterator[Tuple[int, int]]:
        """(offset, size) of every free block."""
        for order, free in enumerate(self._free):
            for offset in free:
                yield offset, 1 << order

    def free_block_counts(self) -> Dict[int, int]:
        """Block size -> how many free blocks of that size."""
        return {1 << order: len(free) for order, free in enumerate(self._free) if free}

    def metadata_bytes(self) -> int:
        """The tree's and the free lists' memory, estimated from their counts."""
        leaves = self.split_blocks + len(self._slots)
        listed = sum(len(free) for free in self._free)
        lists = sum(sys.getsizeof(free) for free in self._free)
        return (
            self.split_blocks * SPLIT_BYTES
            + leaves * LEAF_BYTES
            + lists
            + (listed * OFFSET_KEY_BYTES)
        )

    def _carve(self, block: Block, order: int, base: int, target: int, want: int) -> None:
        """Split the free leaf ``block`` (off its list) down to the leased block at ``target``.

        The halves not on the way down go on the free lists.
        """
        self._free_bytes -= 1 << want
        if order == want:
            block.__class__ = LeasedBlock
            return
        node = SplitBlock(block.parent)
        self._replace(block, node)
        block.parent = None
        self.split_blocks += order - want
        while True:
            order -= 1
            half = 1 << order
            child: Block = SplitBlock(node) if order > want else LeasedBlock(node)
            other = FreeBlock(node)
            if target & half:
                node.left = other
                node.right = child
                self._push(other, order, base)
                base += half
            else:
                node.left = child
                node.right = other
                self._push(other, order, base + half)
            if not isinstance(child, SplitBlock):
                return
            node = child

    def _replace(self, old: Block, new: Block) -> None:
        parent = old.parent
        if isinstance(parent, SplitBlock):
            if parent.left is old:
                parent.left = new
            else:
                parent.right = new
        elif parent is not None:
            parent.child = new

    def _slot_for(self, offset: int) -> Optional[RootSlot]:
        for slot in self._slots:
            if offset < slot.offset + (1 << slot.order):
                return slot if offset >= slot.offset else None
        return None

    def _push(self, block: Block, order: int, offset: int) -> None:
        self._free[order][offset] = block
        self._nonempty |= 1 << order

    def _unlist(self, order: int, offset: int) -> None:
        free = self._free[order]
        del free[offset]
        if not free:
            self._nonempty &= ~(1 << order)
