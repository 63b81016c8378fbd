"""A picture of a server's pool for the terminal: one character per slice of the pool.

Pure text from the numbers of a pool map reply, so that what ``memlease_client.py host
map`` prints can be tested without a server or a terminal.
"""

from typing import List, NamedTuple, Sequence, Tuple

from memlease.units import format_size
from protocol import PoolMapReply

CELLS_PER_LINE = 64


class Shades(NamedTuple):
    """The characters for a cell: free, under 1/3 used, up to 2/3, over 2/3, all used."""

    free: str
    little: str
    half: str
    most: str
    full: str


BLOCKS = Shades("·", "░", "▒", "▓", "█")
ASCII = Shades(".", "-", "+", "*", "#")  # for a terminal that cannot show the blocks


def cell_char(used: int, capacity: int, shades: Shades = BLOCKS) -> str:
    """The character for a cell of ``capacity`` bytes with ``used`` of them in use."""
    if used <= 0 or capacity <= 0:
        return shades.free
    if used >= capacity:
        return shades.full
    third = 3 * used / capacity
    return shades.little if third < 1 else shades.half if third < 2 else shades.most


def render(pool: PoolMapReply, shades: Shades = BLOCKS) -> str:
    """The map, its legend and the allocator's figures, as lines of text.

    Cell ``i`` of ``n`` covers the pool's bytes ``i * pool_bytes // n`` up to
    ``(i + 1) * pool_bytes // n``; its character says how much of that is in use.
    """
    cells = len(pool.used)
    bounds = [i * pool.pool_bytes // cells for i in range(cells + 1)] if cells else [0]
    row = [cell_char(used, bounds[i + 1] - bounds[i], shades) for i, used in enumerate(pool.used)]
    labels = [format_size(bounds[i]) if i else "0" for i in range(0, cells, CELLS_PER_LINE)]
    width = max((len(label) for label in labels), default=0)
    cell_size = format_size(pool.pool_bytes // cells) if cells else "-"
    if cells and pool.pool_bytes % cells:
        cell_size = "about " + cell_size
    lines = [
        "pool of %s in %d cells of %s, %d a line:"
        % (format_size(pool.pool_bytes), cells, cell_size, min(CELLS_PER_LINE, cells))
    ]
    for label, start in zip(labels, range(0, cells, CELLS_PER_LINE)):
        lines.append("%*s %s" % (width, label, "".join(row[start : start + CELLS_PER_LINE])))
    lines.append(
        "%s used  %s over 2/3 used  %s 1/3 to 2/3  %s under 1/3  %s free"
        % (shades.full, shades.most, shades.half, shades.little, shades.free)
    )
    used = pool.pool_bytes - pool.free_bytes
    lines.append(
        "used %s of %s (%d%%), free %s"
        % (
            format_size(used),
            format_size(pool.pool_bytes),
            round(100 * used / pool.pool_bytes) if pool.pool_bytes else 0,
            format_size(pool.free_bytes),
        )
    )
    lines.append(
        "fragmentation %s%%: the largest free block is %s"
        % (_per_mille_as_percent(pool.fragmentation), format_size(pool.largest_free))
    )
    lines.append("free blocks: " + _free_blocks(pool.free_blocks))
    return "\n".join(lines)


def _free_blocks(blocks: Sequence[Tuple[int, int]]) -> str:
    parts: List[str] = [
        "%d of %s" % (count, format_size(size)) for size, count in sorted(blocks, reverse=True)
    ]
    return ", ".join(parts) if parts else "none"


def _per_mille_as_percent(value: int) -> str:
    return "%d.%d" % divmod(value, 10) if value % 10 else "%d" % (value // 10)
