"""The preprocess stage's memory between runs: decoded images by content hash, never a second copy.

A re-run of the stage decodes only new or changed files; every other image is copied, as bytes,
from the previous run's arrays (``copy_file_range``: inside the kernel, or shared extents on
file systems with reflinks). The arrays come out byte-identical to a run from scratch because a
file's pixels depend only on its bytes, the parameters and the code, which together are the key.

Layout of the cache folder (``.cache/preprocess/`` by default, outside DVC's outputs):

``<key>/``
    the last run with one parameter set (key = hash of image_size, channels, max_pixels, images.py and
    the Pillow version): ``{split}_images.npy`` are hard links to that run's output arrays, so
    they cost no disk while the outputs or DVC's cache (which links the same inode) exist;
    ``index.npy`` (sha256, split, row) and ``sums.npy`` (exact per-channel pixel sums per row,
    for the mean and std).
``files-<code>.npy``
    per source file: size, mtime, ctime and inode → sha256 and grayscale, so an unchanged file is
    neither read nor opened (DVC's own state database does the same for its hashes).

Bounded: each run replaces its key's folder and the file table and deletes all but the
:data:`KEEP_PARAM_SETS` most recent keys, so the cache holds the images of the last runs only.
``make clean-cache`` empties it; a damaged cache is ignored, never trusted.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL

from pipeline.common import images
from pipeline.common.contract import SPLITS, FileRow
from pipeline.common.files import replace_dir, write_atomic

log = logging.getLogger(__name__)

KEEP_PARAM_SETS = 2
# Hex digests: numpy strips trailing NUL bytes from raw "S32" values, which would lose 1 digest in 256.
INDEX_DTYPE = [("digest", "S64"), ("split", "u1"), ("row", "<i8")]
UNKNOWN_GRAY = -1


def code_version() -> str:
    """What the pixels of a file depend on besides its bytes and the params: images.py and Pillow."""
    code = hashlib.sha256(Path(images.__file__).read_bytes()).hexdigest()[:16]
    return f"{code}-pillow{PIL.__version__}"


def file_state(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What changes whenever a file's content may have: size, mtime, ctime (not settable) and inode."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


@dataclass(frozen=True)
class CachedRow:
    fd: int  # the previous run's array file, open for reading
    offset: int  # byte offset of the row in it
    sums: list[int]
    squares: list[int]


def copy_range(src: int, dst: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` between two open files, in the kernel where it can (falls back to pread/pwrite)."""
    kernel = getattr(os, "copy_file_range", None)
    while nbytes:
        done = 0
        if kernel is not None:
            try:
                done = kernel(src, dst, nbytes, src_offset, dst_offset)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel = None
        if not done:
            chunk = os.pread(src, min(nbytes, 1 << 24), src_offset)
            if not chunk:
                raise OSError(f"cached array ended {nbytes} bytes early")
            done = os.pwrite(dst, chunk, dst_offset)
        src_offset, dst_offset, nbytes = src_offset + done, dst_offset + done, nbytes - done


class PixelCache:
    """See the module docstring. ``root=None`` is a cache that never hits and never saves."""

    def __init__(self, root: Path | None):
        self.root = root
        self.code = code_version()
        self.files: dict[str, tuple[tuple[int, int, int, int], str, int]] = {}  # path → state, sha256, gray
        self.gray: dict[str, bool] = {}  # sha256 → grayscale
        self.rows: dict[str, tuple[str, int, list[int], list[int]]] = {}  # sha256 → split, row, sums
        self.sequences: dict[str, list[str]] = {}  # split → sha256 per row of the previous arrays
        self.fds: dict[str, int] = {}
        self.loaded = ""  # the key whose arrays are open
        self.offsets: dict[str, tuple[int, int]] = {}  # split → (header bytes, row bytes)
        if root is not None:
            self._read_files()

    # ------------------------------------------------------------------------- per source file
    def _read_files(self) -> None:
        path = self.root / f"files-{self.code}.npy"
        try:
            table = np.load(path)
            columns = [table[name].tolist() for name in ("path", "size", "mtime", "ctime", "ino", "digest", "gray")]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError) as err:
            log.warning("preprocess cache: ignoring %s (%s)", path, err)
            return
        for name, size, mtime, ctime, ino, digest, gray in zip(*columns, strict=True):
            self.files[name] = ((size, mtime, ctime, ino), digest.decode(), gray)
            if gray != UNKNOWN_GRAY:
                self.gray[digest.decode()] = bool(gray)

    def digest(self, path: str, state: tuple[int, int, int, int]) -> str:
        """The sha256 recorded for this file if it has not changed since, else ''."""
        known = self.files.get(path)
        return known[1] if known is not None and known[0] == state else ""

    def grayscale(self, digest: str) -> bool | None:
        return self.gray.get(digest)

    # ------------------------------------------------------------------------- decoded images
    def key(self, image_size: int, channels: int, max_pixels: int) -> str:
        spec = {"image_size": image_size, "channels": channels, "max_pixels": max_pixels, "code": self.code}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def load(self, key: str, item_shape: tuple[int, ...]) -> None:
        """Open the arrays of the last run with this key."""
        folder = self.root / key if self.root is not None else None
        if folder is None or not (folder / "index.npy").is_file():
            return
        try:
            index, sums = np.load(folder / "index.npy"), np.load(folder / "sums.npy")
            arrays = {split: np.load(folder / f"{split}_images.npy", mmap_mode="r") for split in SPLITS}
            if any(a.dtype != np.uint8 or a.shape[1:] != item_shape for a in arrays.values()) or \
                    sums.shape != (len(index), 2, item_shape[0]):
                raise ValueError("shapes do not match the index")
            rows, sequences = {}, {split: [""] * len(arrays[split]) for split in SPLITS}
            for (digest, split, row), (s, q) in zip(index.tolist(), sums.tolist(), strict=True):
                name = SPLITS[split]
                sequences[name][row] = digest.decode()  # IndexError: a row beyond the array
                rows[digest.decode()] = (name, row, s, q)
            if any("" in sequence for sequence in sequences.values()):
                raise ValueError("rows missing from the index")
        except (OSError, ValueError, KeyError, IndexError) as err:
            log.warning("preprocess cache: ignoring %s (%s)", folder, err)
            return
        self.rows, self.sequences, self.loaded = rows, sequences, key
        for split, array in arrays.items():
            self.fds[split] = os.open(folder / f"{split}_images.npy", os.O_RDONLY)
            self.offsets[split] = (array.offset, int(np.prod(item_shape)))

    def get(self, digest: str) -> CachedRow | None:
        entry = self.rows.get(digest)
        if entry is None:
            return None
        split, row, sums, squares = entry
        header, row_bytes = self.offsets[split]
        return CachedRow(self.fds[split], header + row * row_bytes, sums, squares)

    def unchanged(self, split: str, digests: list[str]) -> Path | None:
        """The previous array of ``split`` if it holds exactly these images in this order."""
        if self.root is None or self.sequences.get(split) != digests:
            return None
        return self.root / self.loaded / f"{split}_images.npy"

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # ------------------------------------------------------------------------- after the run
    def save(self, key: str, out_dir: Path, channels: int, rows: list[FileRow],
             sums: list[tuple[list[int], list[int]]],
             files: list[tuple[str, tuple[int, int, int, int], str, bool | None]]) -> None:
        """Link this run's arrays under ``key`` with their index, record the files; keep the recent keys.

        Args:
            rows: the manifest rows, in the order of ``sums``.
            files: (path, state, sha256, grayscale or None) of every hashed source file.
        """
        self.close()
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with replace_dir(self.root / key) as tmp:
                for split in SPLITS:
                    name = f"{split}_images.npy"
                    # An unchanged split (same images in the same order): DVC links the output
                    # back to the object it already holds, the previous file, so keep that inode
                    # rather than a twin.
                    same = self.sequences.get(split) == [r.sha256 for r in rows if r.split == split]
                    os.link(self.root / key / name if same else out_dir / name, tmp / name)
                index = np.array([(r.sha256.encode(), SPLITS.index(r.split), r.index) for r in rows],
                                 dtype=INDEX_DTYPE)
                np.save(tmp / "index.npy", index)
                np.save(tmp / "sums.npy", np.array(sums, dtype=np.int64).reshape(len(rows), 2, channels))
        except OSError as err:  # e.g. the cache on another file system: a copy would double the disk
            log.warning("preprocess cache not saved (%s): the next run decodes every file", err)
            return
        width = max((len(path) for path, *_ in files), default=1)
        table = np.array(
            [(path, *state, digest.encode(), UNKNOWN_GRAY if gray is None else int(gray))
             for path, state, digest, gray in files],
            dtype=[("path", f"U{width}"), ("size", "<i8"), ("mtime", "<i8"), ("ctime", "<i8"), ("ino", "<u8"),
                   ("digest", "S64"), ("gray", "i1")])

        def write_table(tmp: Path) -> None:
            with open(tmp, "wb") as handle:  # a file object: np.save would add ".npy" to a path
                np.save(handle, table)

        write_atomic(self.root / f"files-{self.code}.npy", write_table)
        self._prune(keep=key)

    def _prune(self, keep: str) -> None:
        for stale in self.root.glob("files-*.npy"):
            if stale.name != f"files-{self.code}.npy":
                stale.unlink()
        folders = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                         key=lambda p: p.stat().st_mtime, reverse=True)
        recent = [keep, *[p.name for p in folders if p.name != keep][: KEEP_PARAM_SETS - 1]]
        for folder in folders:
            if folder.name not in recent:
                shutil.rmtree(folder, ignore_errors=True)
