"""pipeline.datasets: the digits set matches data.dvc, IDX import, folder scanning."""

from __future__ import annotations

import gzip
import json
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

from pipeline.datasets import main as datasets_main
from pipeline.lib.dataset_folders import (
    DatasetError,
    idx_split,
    import_idx,
    read_idx,
    scan_dataset,
    scan_image_folder,
    write_digits,
)
from tests.conftest import copy_project, sh, tool_env

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


def test_idx_import_keeps_train_and_test_apart_and_writes_the_label_order(tmp_path: Path) -> None:
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
    names = ["zero", "one", "two"]  # not alphabetical: the file, not the folder names, gives the order
    assert import_idx(image_files, label_files, out, names) == 10
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "test", "train"]
    assert (out / "classes.txt").read_text() == "zero\none\ntwo\n"
    for split, stem, images, labels in [("train", "train", train_images, train_labels),
                                        ("test", "t10k", test_images, test_labels)]:
        written = sorted(p.relative_to(out / split).as_posix() for p in (out / split).rglob("*.png"))
        assert written == sorted(f"{names[label]}/{stem}_{i:05d}.png" for i, label in enumerate(labels))
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            saved = np.asarray(Image.open(out / split / names[label] / f"{stem}_{index:05d}.png"))
            np.testing.assert_array_equal(saved, image)

    dataset = scan_dataset(out)
    assert (dataset.classes, dataset.classes_source, dataset.split_folders) == (names, "file", ("test", "train"))
    assert sorted((rel.rsplit("/", 1)[1], names[label], split) for rel, label, split in dataset.files) == sorted(
        [(f"train_{i:05d}.png", names[label], "train") for i, label in enumerate(train_labels)]
        + [(f"t10k_{i:05d}.png", names[label], "test") for i, label in enumerate(test_labels)])


@pytest.mark.parametrize("name, split", [
    ("train-images-idx3-ubyte.gz", "train"), ("t10k-images-idx3-ubyte", "test"),
    ("emnist-balanced-train-images-idx3-ubyte.gz", "train"), ("emnist-balanced-test-images-idx3-ubyte", "test"),
])
def test_idx_split_from_the_file_name(name: str, split: str) -> None:
    assert idx_split(name) == split


def test_idx_split_unknown_name_asks_for_splits(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "x-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DatasetError, match=re.escape(f"{images}: cannot tell") + ".*give --splits"):
        import_idx([images], [labels], tmp_path / "data")
    with pytest.raises(DatasetError, match="no training file"):
        import_idx([images], [labels], tmp_path / "data", splits=["test"])
    assert import_idx([images], [labels], tmp_path / "data", splits=["train"]) == 2


def test_idx_import_without_class_names_uses_label_numbers(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "x-images-idx3-ubyte", np.zeros((3, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "x-labels-idx1-ubyte", np.array([0, 3, 3]))
    assert import_idx([images], [labels], tmp_path / "data", splits=["train"]) == 3
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == ["0", "3"]
    # Every label up to the largest: "10" after "9", never sorted as text.
    assert (tmp_path / "data" / "classes.txt").read_text() == "0\n1\n2\n3\n"


def test_idx_cli_classes_file_and_list(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 0]))
    (tmp_path / "names.txt").write_text("Ankle boot\n\nT-shirt\n")
    args = ["idx", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "data")]
    assert datasets_main([*args, "--classes", str(tmp_path / "names.txt")]) == 0
    assert scan_dataset(tmp_path / "data").classes == ["Ankle boot", "T-shirt"]
    assert datasets_main([*args, "--force", "--classes", "b,a"]) == 0
    assert (tmp_path / "data" / "classes.txt").read_text() == "b\na\n"


def test_idx_bad_magic_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8))[2:])
    labels = write_idx(tmp_path / "bad-labels-idx1-ubyte", np.array([0, 1]))
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: not an IDX file")):
        import_idx([bad], [labels], tmp_path / "data", splits=["train"])
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
        import_idx([images], [labels], tmp_path / "data", splits=["train"])
    assert not (tmp_path / "data").exists()


def test_idx_too_few_class_names(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 2]))
    with pytest.raises(DatasetError, match="2 class names given but labels go up to 2"):
        import_idx([images], [labels], tmp_path / "data", ["a", "b"], splits=["train"])


def test_idx_import_refuses_non_empty_folder_and_force_replaces(tmp_path: Path) -> None:
    images = write_idx(tmp_path / "a-images-idx3-ubyte", np.zeros((2, 2, 2), dtype=np.uint8))
    labels = write_idx(tmp_path / "a-labels-idx1-ubyte", np.array([0, 1]))
    out = tmp_path / "data"
    (out / "old").mkdir(parents=True)
    (out / "old" / "x.png").write_bytes(b"old")
    with pytest.raises(DatasetError, match="not empty"):
        import_idx([images], [labels], out, splits=["train"])
    assert (out / "old" / "x.png").read_bytes() == b"old"
    import_idx([images], [labels], out, force=True, splits=["train"])
    assert sorted(p.name for p in out.iterdir()) == ["classes.txt", "train"]


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


def touch(root: Path, *relative: str) -> None:
    for rel in relative:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_scan_flat_layout_is_unchanged(tmp_path: Path) -> None:
    touch(tmp_path, "b/2.png", "a/1.png", "a/sub/3.png")
    dataset = scan_dataset(tmp_path)
    assert (dataset.classes, dataset.classes_source, dataset.split_folders) == (["a", "b"], "folders", ())
    assert dataset.files == [
        ("a/1.png", 0, ""), ("a/sub/3.png", 0, ""), ("b/2.png", 1, "")]


def test_scan_pre_split_layout(tmp_path: Path) -> None:
    touch(tmp_path, "train/dog/1.png", "train/cat/2.png", "test/cat/3.png", "test/dog/4.png", "train/.hidden/5.png")
    dataset = scan_dataset(tmp_path)
    assert (dataset.classes, dataset.split_folders) == (["cat", "dog"], ("test", "train"))
    assert sorted(dataset.files) == [
        ("test/cat/3.png", 0, "test"), ("test/dog/4.png", 1, "test"),
        ("train/cat/2.png", 0, "train"), ("train/dog/1.png", 1, "train")]


@pytest.mark.parametrize("folders, names", [
    (["train/a/1.png", "cat/2.png"], "train.*cat"),  # a class folder beside a split folder
    (["test/a/1.png", "val/a/2.png"], "val.*no train/"),  # no train split
    (["train/a/1.png", "valid/a/2.png"], "valid"),  # not a split name we know
])
def test_scan_refuses_a_mixed_layout(tmp_path: Path, folders: list[str], names: str) -> None:
    touch(tmp_path, *folders)
    with pytest.raises(DatasetError, match=f"mixes split folders.*{names}"):
        scan_dataset(tmp_path)


def test_classes_file_and_param_set_the_order(tmp_path: Path) -> None:
    touch(tmp_path, "a/1.png", "b/2.png", "c/3.png")
    (tmp_path / "classes.txt").write_text("c\na\nb\n")
    dataset = scan_dataset(tmp_path)
    assert (dataset.classes, dataset.classes_source) == (["c", "a", "b"], "file")
    assert sorted((rel, label) for rel, label, _ in dataset.files) == [("a/1.png", 1), ("b/2.png", 2), ("c/3.png", 0)]
    param = scan_dataset(tmp_path, ["b", "c", "a"])  # the param wins over the file
    assert (param.classes, param.classes_source) == (["b", "c", "a"], "param")
    assert sorted((rel, label) for rel, label, _ in param.files) == [("a/1.png", 2), ("b/2.png", 0), ("c/3.png", 1)]


def test_explicit_order_must_list_every_class_folder(tmp_path: Path) -> None:
    touch(tmp_path, "a/1.png", "b/2.png", "stray/3.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    with pytest.raises(DatasetError, match=re.escape(f"stray in {tmp_path} not listed in {tmp_path / 'classes.txt'}")):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="listed twice: a"):
        scan_dataset(tmp_path, ["a", "b", "stray", "a"])
    (tmp_path / "classes.txt").write_text("a\n../b\n")
    with pytest.raises(DatasetError, match="'../b' cannot be a class folder name"):
        scan_dataset(tmp_path)


IDX_NAMES = ["zero", "one", "two"]  # label order; alphabetically it would be one, two, zero


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_idx_import_and_dvc_repro_keep_the_official_test_split_and_label_order(tmp_path: Path) -> None:
    """The README's IDX route through `dvc repro train`, output to a pipe: the test split is the test
    file, label i is class i in the arrays and the model, progress lines show up, a re-run is incremental,
    and the arrays exist once on disk (workspace, DVC cache and preprocess cache are one inode)."""
    repo = copy_project(tmp_path / "repo", {
        "preprocess": {"image_size": 32, "val_fraction": 0.2, "workers": 2},
        "train": {"epochs": 1, "batch_size": 32, "threads": 2},
    })
    rng = np.random.default_rng(0)
    train_labels, test_labels = np.arange(120) % 3, rng.permutation(np.arange(30) % 3)
    train_images = rng.integers(0, 256, (120, 8, 8), dtype=np.uint8)
    test_images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)  # different files, different images
    raw = tmp_path / "raw"
    raw.mkdir()
    files = [write_idx(raw / name, array) for name, array in [
        ("train-images-idx3-ubyte.gz", train_images), ("t10k-images-idx3-ubyte.gz", test_images),
        ("train-labels-idx1-ubyte.gz", train_labels), ("t10k-labels-idx1-ubyte.gz", test_labels)]]
    sh(repo, "bin/python", "-m", "pipeline.datasets", "idx", "--out", "data", "--force",
       "--images", str(files[0]), str(files[1]), "--labels", str(files[2]), str(files[3]),
       "--classes", ",".join(IDX_NAMES))
    sh(repo, "dvc", "add", "-q", "data")
    out = sh(repo, "dvc", "repro", "train", env=tool_env(CNN_PROGRESS_INTERVAL="0"))  # stdout, stderr: pipes

    result = repo / "artifacts" / "preprocessed"
    manifest = json.loads((result / "manifest.json").read_text())
    assert (manifest["classes"], manifest["classes_source"]) == (IDX_NAMES, "file")
    assert manifest["split_source"] == {"train": "folder", "val": "hash", "test": "folder"}
    labels = {split: np.load(result / f"{split}_labels.npy") for split in ("train", "val", "test")}
    test_rows = sorted((row["path"], row["index"]) for row in manifest["files"] if row["split"] == "test")
    assert [path for path, _ in test_rows] == sorted(
        f"test/{IDX_NAMES[label]}/t10k_{i:05d}.png" for i, label in enumerate(test_labels))
    for path, index in test_rows:  # label i of the dataset is index i in the arrays
        assert labels["test"][index] == test_labels[int(path.rsplit("_", 1)[1][:5])]
    assert not [row for row in manifest["files"] if row["split"] != "test" and row["path"].startswith("test/")]
    assert len(labels["train"]) + len(labels["val"]) == 120
    # The card travels unchanged from here to the ONNX metadata, MLflow and the service (test_pipeline).
    from pipeline.lib.trained import load_trained  # torch: imported only by this slow test

    _, card = load_trained(repo / "artifacts" / "train" / "model.pt")
    assert card.classes == IDX_NAMES

    lines = out.splitlines()
    assert any(re.fullmatch(r"decode: 150/150 img \(100%\), .*ETA 00:00", line) for line in lines), out[-3000:]
    assert any(re.match(r"train: \d+/3 batch \(\d+%\), [\d.?]+batch/s", line) for line in lines), out[-3000:]

    # Incremental under DVC: 3 new training images, one re-decoded each; nothing else is opened.
    for label, name in enumerate(IDX_NAMES):
        pixels = np.full((8, 8), 60 * label + 10, dtype=np.uint8)
        Image.fromarray(pixels).save(repo / "data" / "train" / name / "new.png")
    sh(repo, "dvc", "add", "-q", "data")
    again = sh(repo, "dvc", "repro", "preprocess")
    assert "153 images: 3 to decode, 150 from the cache" in again
    dvc_cache = {p.stat().st_ino for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file()}
    for split in ("train", "val", "test"):  # changed (train or val) and unchanged (test) arrays alike
        arrays = result / f"{split}_images.npy"
        (cached,) = (repo / ".cache" / "preprocess").glob(f"*/{split}_images.npy")
        # One inode for the workspace, DVC's cache and the preprocess cache: the arrays exist once.
        assert arrays.stat().st_nlink == 3 and arrays.stat().st_ino == cached.stat().st_ino
        assert arrays.stat().st_ino in dvc_cache
