"""A minimal PE32+ image writer for tests: a UKI's section table and data, nothing runnable.

Raw data is padded to the file alignment as linkers and ukify do, so SizeOfRawData exceeds
VirtualSize and a reader that measures the padding gives itself away.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

FILE_ALIGN = 0x200
_OPTIONAL = 240  # PE32+ optional header with 16 data directories


def pe_image(sections: Sequence[tuple[str, bytes]], *, raw_sizes: dict[str, int] | None = None) -> bytes:
    """A PE32+ file holding ``sections`` (name, contents) in the given file order.

    ``raw_sizes`` overrides a section's SizeOfRawData (to make one shorter than its contents).
    """
    pe_at = 0x40
    table = pe_at + 24 + _OPTIONAL
    data_at = -(-(table + 40 * len(sections)) // FILE_ALIGN) * FILE_ALIGN
    header = bytearray(data_at)
    header[0:2] = b"MZ"
    struct.pack_into("<I", header, 0x3C, pe_at)
    header[pe_at:pe_at + 4] = b"PE\0\0"
    struct.pack_into("<HHIIIHH", header, pe_at + 4, 0x8664, len(sections), 0, 0, 0, _OPTIONAL, 0x0022)
    struct.pack_into("<H", header, pe_at + 24, 0x20B)  # PE32+ magic
    body = bytearray()
    for i, (name, content) in enumerate(sections):
        padded = content + bytes(-len(content) % FILE_ALIGN)
        raw_size = (raw_sizes or {}).get(name, len(padded))
        entry = table + 40 * i
        header[entry:entry + 8] = name.encode().ljust(8, b"\0")
        struct.pack_into("<IIII", header, entry + 8, len(content), 0x1000 * (i + 1), raw_size,
                         data_at + len(body))
        body += padded
    return bytes(header + body)
