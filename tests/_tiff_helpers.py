"""Tiny hand-built TIFF files for hostile and format tests."""

from __future__ import annotations

import struct


def huge_tiff(path, side=10**6, rows_per_strip=None):
    """A 138-byte uncompressed RGB TIFF declaring ``side`` x ``side`` px in one strip."""
    entries = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 1), (262, 3, 2),
               (273, 4, 0), (277, 3, 3), (278, 4, rows_per_strip or side), (279, 4, 4),
               (284, 3, 1)]
    data_off = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, val in entries:
        val = data_off if tag == 273 else val
        out += (struct.pack("<HHIHH", tag, typ, 1, val, 0) if typ == 3
                else struct.pack("<HHII", tag, typ, 1, val))
    out += struct.pack("<I", 0) + b"\xff" * 4
    path.write_bytes(bytes(out))
    return path
