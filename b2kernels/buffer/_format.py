"""On-disk format of a saved arena (shared by the python and C++ backends, byte for byte).

All integers little-endian::

    magic        8s   b"B2KARENA"
    version      u32  FORMAT_VERSION
    dtype_code   u32  see b2kernels.buffer.arena.DTYPE_CODES
    elem_size    u64
    ndim         u64
    shape        i64[ndim]
    num_steps    u64
    max_trees    u64  (of the arena that wrote it; informational)
    branches     u64
    num_trees    u64
    used_slots   u64  latents stored
    payload_len  u64  bytes between the end of this header and the checksum
    payload:
      tree_prompt  i64[num_trees]
      tree_split   i64[num_trees]
      tree_offset  i64[num_trees]   first slot of the tree's segment
      reward       f32[num_trees*branches]
      advantage    f32[num_trees*branches]
      logprob      f32[num_trees*branches*num_steps]
      latents      u8[used_slots*latent_nbytes]
    crc32        u32  zlib CRC-32 of every byte before it

A file is written to ``<path>.tmp.<pid>`` in the same directory, fsync'ed and renamed over ``path``.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"B2KARENA"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<8sIIQQ")  # magic, version, dtype_code, elem_size, ndim
_COUNTS = struct.Struct("<6Q")  # num_steps, max_trees, branches, num_trees, used_slots, payload_len


@dataclass
class Header:
    dtype_code: int
    elem_size: int
    shape: tuple[int, ...]
    num_steps: int
    max_trees: int
    branches: int
    num_trees: int
    used_slots: int
    payload_len: int

    @property
    def latent_nbytes(self) -> int:
        n = self.elem_size
        for d in self.shape:
            n *= d
        return n

    def expected_payload_len(self) -> int:
        nt, n = self.num_trees, self.num_trees * self.branches
        return 3 * 8 * nt + 4 * 2 * n + 4 * n * self.num_steps + self.used_slots * self.latent_nbytes

    def pack(self) -> bytes:
        return (
            _FIXED.pack(MAGIC, FORMAT_VERSION, self.dtype_code, self.elem_size, len(self.shape))
            + struct.pack(f"<{len(self.shape)}q", *self.shape)
            + _COUNTS.pack(
                self.num_steps,
                self.max_trees,
                self.branches,
                self.num_trees,
                self.used_slots,
                self.payload_len,
            )
        )


def parse(data: bytes | memoryview, path: str) -> tuple[Header, int]:
    """Validate magic, version, sizes and checksum of a whole file; return (header, payload offset)."""
    data = memoryview(data)
    if len(data) < _FIXED.size or bytes(data[:8]) != MAGIC:
        raise ValueError(f"{path}: not a b2kernels arena file (bad magic; expected {MAGIC!r} at offset 0)")
    _, version, dtype_code, elem_size, ndim = _FIXED.unpack_from(data, 0)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: arena file format version {version}, this build reads version {FORMAT_VERSION}"
        )
    if ndim > 8:
        raise ValueError(f"{path}: corrupted header (ndim={ndim})")
    off = _FIXED.size
    if len(data) < off + 8 * ndim + _COUNTS.size + 4:
        raise ValueError(f"{path}: truncated arena file ({len(data)} bytes, header incomplete)")
    shape = struct.unpack_from(f"<{ndim}q", data, off)
    off += 8 * ndim
    counts = _COUNTS.unpack_from(data, off)
    off += _COUNTS.size
    h = Header(dtype_code, elem_size, tuple(shape), *counts)
    if h.payload_len != h.expected_payload_len():
        raise ValueError(
            f"{path}: corrupted header (payload length {h.payload_len} does not match the counts)"
        )
    total = off + h.payload_len + 4
    if len(data) != total:
        raise ValueError(f"{path}: truncated or padded arena file: {len(data)} bytes, header says {total}")
    (stored,) = struct.unpack_from("<I", data, total - 4)
    actual = zlib.crc32(data[: total - 4])
    if stored != actual:
        raise ValueError(
            f"{path}: checksum mismatch (stored {stored:#010x}, computed {actual:#010x}): file is corrupted"
        )
    return h, off


def write_atomic(path: str, chunks) -> None:
    """Write ``chunks`` (bytes-like) + their CRC-32 to ``path`` atomically: temp file, fsync, rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    crc = 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                crc = zlib.crc32(c, crc)
                f.write(c)
            f.write(struct.pack("<I", crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
