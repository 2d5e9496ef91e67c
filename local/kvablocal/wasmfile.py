"""Just enough of the WebAssembly binary format to read a module's exports and initial memory
(the export budget in tests/test_budgets.py, the memory figure of bench/filterbench.py)."""

from pathlib import Path

EXPORT_SECTION = 7
MEMORY_SECTION = 5


def leb(data: bytes, i: int) -> tuple:
    """An unsigned LEB128 at i: (value, index after it)."""
    value = shift = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if b < 0x80:
            return value, i


def section(data: bytes, wanted: int):
    """Index of the body of the first section with id `wanted`, or None."""
    assert data[:4] == b"\0asm", "not a wasm module"
    i = 8
    while i < len(data):
        size, body = leb(data, i + 1)
        if data[i] == wanted:
            return body
        i = body + size
    return None


def exports(path) -> set:
    """Export names."""
    data = Path(path).read_bytes()
    j = section(data, EXPORT_SECTION)
    if j is None:
        return set()
    count, j = leb(data, j)
    names = set()
    for _ in range(count):
        n, j = leb(data, j)
        names.add(data[j : j + n].decode())
        _, j = leb(data, j + n + 1)  # kind byte, then the index
    return names


def initial_memory_pages(path) -> int:
    """Initial pages (64 KiB) of the module's linear memory."""
    data = Path(path).read_bytes()
    j = section(data, MEMORY_SECTION)
    if j is None:
        return 0
    _, j = leb(data, j)  # count
    _, j = leb(data, j)  # flags
    return leb(data, j)[0]
