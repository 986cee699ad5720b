"""The preprocess stage's output arrays, written row by row: memory does not grow with the dataset.

A split whose images changed is streamed into an ``.npy`` file (:class:`NpyWriter`; rows of the
previous run are copied as byte ranges, see :mod:`pipeline.lib.pixelcache`); an unchanged one is
a hard link to the previous run's array (:class:`LinkedSplit`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from pipeline.lib.pixelcache import CachedRow, copy_range


class LinkedSplit:
    """A split whose images and order did not change: a hard link to the previous run's array."""

    def __init__(self, path: Path, previous: Path):
        self.path, self.previous, self.count = path, previous, 0

    def append_cached(self, row: CachedRow) -> None:
        self.count += 1

    def append(self, array: np.ndarray) -> None:
        raise AssertionError("an unchanged split has only cached rows")

    def close(self) -> None:
        os.link(self.previous, self.path)


class NpyWriter:
    """Append C×H×W arrays to an ``.npy`` file without holding them in memory."""

    def __init__(self, path: Path, item_shape: tuple[int, ...], capacity: int):
        self.path, self.item_shape, self.count = path, item_shape, 0
        self.row_bytes = int(np.prod(item_shape))
        self.file = open(path, "wb")
        self._header(capacity)
        self.data_start = self.file.tell()
        self.pending: tuple[int, int, int] | None = None  # cached rows to copy: (fd, offset, bytes)

    def _header(self, count: int) -> None:
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, *self.item_shape)}
        np.lib.format.write_array_header_1_0(self.file, header)

    def append(self, array: np.ndarray) -> None:
        self._copy_pending()
        self.file.write(np.ascontiguousarray(array).data)
        self.count += 1

    def append_cached(self, row: CachedRow) -> None:
        """Append a row of a previous run's array; consecutive rows are copied as one range."""
        if self.pending and self.pending[0] == row.fd and self.pending[1] + self.pending[2] == row.offset:
            self.pending = (row.fd, self.pending[1], self.pending[2] + self.row_bytes)
        else:
            self._copy_pending()
            self.pending = (row.fd, row.offset, self.row_bytes)
        self.count += 1

    def _copy_pending(self) -> None:
        if self.pending is None:
            return
        fd, offset, nbytes = self.pending
        self.pending = None
        self.file.flush()
        position = self.file.tell()
        copy_range(fd, self.file.fileno(), offset, position, nbytes)
        self.file.seek(position + nbytes)

    def close(self) -> None:
        """Rewrite the header with the real count (files may have been skipped)."""
        self._copy_pending()
        self.file.seek(0)
        self._header(self.count)
        if self.file.tell() != self.data_start:  # header length changed: copy the data over
            self.file.close()
            moved = self.path.with_suffix(".move")
            with open(self.path, "rb") as src, open(moved, "wb") as dst:
                np.lib.format.write_array_header_1_0(
                    dst, {"descr": "|u1", "fortran_order": False, "shape": (self.count, *self.item_shape)}
                )
                src.seek(self.data_start)
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(moved, self.path)
            return
        self.file.truncate(self.data_start + self.count * self.row_bytes)
        self.file.close()
