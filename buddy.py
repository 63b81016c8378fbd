"""A buddy allocator over offsets: it hands out blocks of a pool, never touches the bytes.

Blocks are nodes of a tree with parent and child links, as in the C++ original.
Unlike the original, a free list per order (a dict keyed by offset) and a bit mask of
the non-empty orders find a block without walking the tree, so alloc and free cost
O(log pool size).  A pool that is not a power of two is split into power-of-two roots,
largest first, so every block stays aligned to its size and its buddy sits at
``offset ^ size``.
"""

from typing import Dict, List, Optional


class Block:
    """A node of the tree: a power-of-two run of the pool at ``offset``."""

    __slots__ = ("offset", "order", "parent", "left", "right", "allocated")

    def __init__(self, offset: int, order: int, parent: "Optional[Block]") -> None:
        self.offset = offset
        self.order = order
        self.parent = parent
        self.left: Optional[Block] = None
        self.right: Optional[Block] = None
        self.allocated = False

    @property
    def size(self) -> int:
        return 1 << self.order

    def __repr__(self) -> str:
        return "Block(offset=%d, size=%d)" % (self.offset, self.size)


class BuddyAllocator:
    """Allocates power-of-two blocks of at least ``min_block`` bytes from ``pool_size``."""

    def __init__(self, pool_size: int, min_block: int = 32) -> None:
        if min_block <= 0 or min_block & (min_block - 1):
            raise ValueError("min_block must be a positive power of two")
        if pool_size < min_block:
            raise ValueError("the pool must hold at least one block of %d bytes" % min_block)
        self.pool_size = pool_size
        self.min_order = min_block.bit_length() - 1
        self.roots: List[Block] = []
        self._free: List[Dict[int, Block]] = [{} for _ in range(pool_size.bit_length())]
        self._nonempty = 0  # bit k set <=> self._free[k] is not empty
        offset = 0
        for order in range(pool_size.bit_length() - 1, self.min_order - 1, -1):
            if pool_size & (1 << order):
                root = Block(offset, order, None)
                self.roots.append(root)
                self._push(root)
                offset += 1 << order
        self.capacity = offset
        self._free_bytes = offset

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
        want = self.order_for(size)
        candidates = self._nonempty >> want
        if not candidates:
            return None
        order = want + (candidates & -candidates).bit_length() - 1
        block = self._pop(order)
        while order > want:
            order -= 1
            block.left = Block(block.offset, order, block)
            block.right = Block(block.offset + (1 << order), order, block)
            self._push(block.right)
            block = block.left
        block.allocated = True
        self._free_bytes -= 1 << want
        return block

    def free(self, block: Block) -> None:
        """Return a block; it merges with its buddy up the tree while both are free."""
        if not block.allocated:
            raise ValueError("%r is not allocated" % (block,))
        block.allocated = False
        self._free_bytes += block.size
        parent = block.parent
        while parent is not None:
            free = self._free[block.order]
            if free.pop(block.offset ^ block.size, None) is None:
                break  # the buddy is allocated or split: no merge
            if not free:
                self._nonempty &= ~(1 << block.order)
            parent.left = parent.right = None
            block = parent
            parent = block.parent
        self._push(block)

    def _push(self, block: Block) -> None:
        self._free[block.order][block.offset] = block
        self._nonempty |= 1 << block.order

    def _pop(self, order: int) -> Block:
        free = self._free[order]
        block = free.popitem()[1]
        if not free:
            self._nonempty &= ~(1 << order)
        return block
