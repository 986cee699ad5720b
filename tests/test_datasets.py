"""pipeline.datasets: the digits set matches data.dvc, IDX import, folder scanning."""

from __future__ import annotations

import gzip
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.datasets import DatasetError, import_idx, read_idx, scan_image_folder, write_digits

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's dvc sits next to its python


def run(*cmd: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX bytes: magic (0, 0, type, ndim), big-endian dimensions, then the data."""
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(">u1").tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.slow
def test_digits_regenerate_data_dvc_byte_for_byte(tmp_path: Path) -> None:
    expected = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    run("git", "init", "-q", cwd=tmp_path)
    run("dvc", "init", "-q", cwd=tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    (data / "stale.txt").write_text("left over from an older dataset\n")
    with pytest.raises(DatasetError, match="not empty; pass --force"):
        write_digits(data)
    assert (data / "stale.txt").exists()

    assert write_digits(data, force=True) == 1797  # replaces the folder: stale.txt must go
    run("dvc", "add", "-q", "data", cwd=tmp_path)
    produced = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert (produced["md5"], produced["nfiles"], produced["size"]) == (
        expected["md5"],
        expected["nfiles"],
        expected["size"],
    )


def test_write_digits_into_an_empty_folder_needs_no_force(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    assert write_digits(tmp_path / "data") == 1797
    classes, files = scan_image_folder(tmp_path / "data")
    assert classes == [str(d) for d in range(10)]
    assert len(files) == 1797
    assert not [p for p in tmp_path.iterdir() if p.name != "data"]  # no temporary folder left


def test_idx_import_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    train_labels = np.array([0, 1, 2, 1, 0, 2, 2])
    test_images = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    test_labels = np.array([2, 0, 0])
    image_files = [
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_images),  # gzipped
        write_idx(tmp_path / "t10k-images-idx3-ubyte", test_images),  # plain
    ]
    label_files = [
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_labels),
        write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_labels),
    ]
    np.testing.assert_array_equal(read_idx(image_files[0]), train_images)
    np.testing.assert_array_equal(read_idx(label_files[1]), test_labels)

    out = tmp_path / "data"
    assert import_idx(image_files, label_files, out, ["zero", "one", "two"]) == 10
    assert sorted(p.name for p in out.iterdir()) == ["one", "two", "zero"]
    names = ["zero", "one", "two"]
    for stem, images, labels in [("train", train_images, train_labels), ("t10k", test_images, test_labels)]:
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            saved = np.asarray(Image.open(out / names[label] / f"{stem}_{index:05d}.png"))
            np.testing.assert_array_equal(saved, image)
    for label, name in enumerate(names):
        expected = int((train_labels == label).sum() + (test_labels == label).sum())
        assert len(list((out / name).iterdir())) == expected


def test_idx_import_without_class_names_uses_label_numbers(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "x-labels-idx1-ubyte", np.array([0, 3, 3]))
    assert import_idx([images], [labels], tmp_path / "data") == 3
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["0", "3"]


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8))[2:])
    labels = write_idx(tmp_path / "bad-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: not an IDX file")):
        import_idx([bad], [labels], tmp_path / "data")
    gz = tmp_path / "bad-images-idx3-ubyte.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=re.escape(f"{gz}: cannot read")):
        read_idx(gz)


def test_idx_truncated_data_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "short-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((4, 3, 3), dtype=np.uint8))[:-5])
    message = f"{path}: expected 36 data bytes for shape (4, 3, 3), found 31"
    with pytest.raises(DatasetError, match=re.escape(message)):
        read_idx(path)


def test_idx_count_mismatch_names_the_files(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DatasetError, match=re.escape(f"{images}: 3 images but {labels} has 2 labels")):
        import_idx([images], [labels], tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_idx_too_few_class_names(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 2]))
    with pytest.raises(DatasetError, match="2 class names given but labels go up to 2"):
        import_idx([images], [labels], tmp_path / "data", ["a", "b"])


def test_idx_import_refuses_non_empty_folder_and_force_replaces(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 1]))
    out = tmp_path / "data"
    (out / "old").mkdir(parents=True)
    (out / "old" / "x.png").write_bytes(b"old")
    with pytest.raises(DatasetError, match="not empty"):
        import_idx([images], [labels], out)
    assert (out / "old" / "x.png").read_bytes() == b"old"
    import_idx([images], [labels], out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["0", "1"]


def test_scan_ignores_hidden_files_and_folders(tmp_path: Path) -> None:
    for rel in ["b/2.png", "a/1.png", "a/sub/3.png", "a/.DS_Store", "a/.hidden/x.png", ".git/config"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    classes, files = scan_image_folder(tmp_path)
    assert classes == ["a", "b"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in files] == [
        ("a/1.png", 0),
        ("a/sub/3.png", 0),
        ("b/2.png", 1),
    ]


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="dataset folder not found"):
        scan_image_folder(tmp_path / "nowhere")
