"""The preprocess stage: arrays and manifest, stable split, bad data, atomic output, dvc repro."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.common import images
from pipeline.common.errors import UserError
from pipeline.lib.config import PreprocessParams
from pipeline.preprocess import SPLITS, PreprocessError, assign_split, images_needed, preprocess_folder

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # dvc, and the python that dvc.yaml's `python -m` must find
SEED = 7


def params(**overrides: object) -> PreprocessParams:
    """Tiny outputs; 20 % val and test so 30 images per class reach every split."""
    values = {"image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "workers": 2, **overrides}
    return PreprocessParams(**values)


def rows_by_path(manifest) -> dict[str, dict]:
    manifest = manifest if isinstance(manifest, dict) else manifest.model_dump()
    return {row["path"]: row for row in manifest["files"]}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_arrays_labels_and_manifest_agree(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = preprocess_folder(image_folder, out, params(), SEED).model_dump()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["classes"] == ["c0", "c1", "c2"]
    assert (manifest["channels"], manifest["image_size"], manifest["skipped"]) == (3, 16, [])
    assert sum(manifest["counts"].values()) == len(manifest["files"]) == 90

    arrays = {s: np.load(out / f"{s}_images.npy", mmap_mode="r") for s in SPLITS}
    labels = {s: np.load(out / f"{s}_labels.npy") for s in SPLITS}
    for split in SPLITS:
        assert arrays[split].shape == (manifest["counts"][split], 3, 16, 16)
        assert arrays[split].dtype == np.uint8 and labels[split].dtype == np.int64
        counts = np.bincount(labels[split], minlength=3).tolist()
        assert counts == manifest["class_counts"][split]
    for row in manifest["files"]:
        path = image_folder / row["path"]
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row["split"] == assign_split(row["sha256"], SEED, 0.2, 0.2)
        assert labels[row["split"]][row["index"]] == manifest["classes"].index(row["class_name"])
        np.testing.assert_array_equal(arrays[row["split"]][row["index"]], images.preprocess(path, 16, 3))

    train = arrays["train"].reshape(len(arrays["train"]), 3, -1) / 255.0
    np.testing.assert_allclose(manifest["mean"], train.mean(axis=(0, 2)), atol=1e-5)
    np.testing.assert_allclose(manifest["std"], train.std(axis=(0, 2)), atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("data", "out")]  # no temp folder


def test_channels_auto_is_one_for_a_grayscale_folder(tmp_path: Path, make_image_folder: Callable) -> None:
    data = make_image_folder(tmp_path / "data", classes=2, per_class=12)
    for path in data.rglob("*.png"):
        images.open_image(path).convert("L").save(path)
    manifest = preprocess_folder(data, tmp_path / "out", params(val_fraction=0.3, test_fraction=0.3), SEED).model_dump()
    assert manifest["channels"] == 1
    assert np.load(tmp_path / "out" / "train_images.npy").shape[1:] == (1, 16, 16)


def test_split_is_stable_when_images_are_added_or_renamed(
    tmp_path: Path, make_image_folder: Callable
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=30)
    before = rows_by_path(preprocess_folder(data, tmp_path / "out", params(), SEED))

    make_image_folder(data, per_class=30, start=30)  # 90 new images
    (data / "c1" / "img_005.png").rename(data / "c1" / "renamed.png")
    after = rows_by_path(preprocess_folder(data, tmp_path / "out", params(), SEED))

    assert len(after) == 180
    moved = {path: row["split"] for path, row in before.items() if path != "c1/img_005.png"}
    assert moved == {path: after[path]["split"] for path in moved}
    assert after["c1/renamed.png"]["split"] == before["c1/img_005.png"]["split"]
    assert after["c1/renamed.png"]["sha256"] == before["c1/img_005.png"]["sha256"]
    # A different seed gives a different split: the seed really is part of the function.
    reseeded = rows_by_path(preprocess_folder(data, tmp_path / "out2", params(), SEED + 1))
    assert any(reseeded[p]["split"] != after[p]["split"] for p in after)


def test_bad_files_are_skipped_with_their_reason(
    image_folder: Path, tmp_path: Path, bad_files: dict[str, tuple[bytes, str]]
) -> None:
    for name, (data, _) in bad_files.items():
        (image_folder / "c0" / name).write_bytes(data)
    manifest = preprocess_folder(image_folder, tmp_path / "out", params(on_error="skip"), SEED).model_dump()

    skipped = {entry["path"]: entry["reason"] for entry in manifest["skipped"]}
    assert set(skipped) == {f"c0/{name}" for name in bad_files}
    for name, (_, reason) in bad_files.items():
        assert skipped[f"c0/{name}"].startswith(f"{reason}: "), (name, skipped[f"c0/{name}"])
        assert name in skipped[f"c0/{name}"]
    assert not set(skipped) & set(rows_by_path(manifest))
    assert sum(manifest["counts"].values()) == 90
    total = sum(len(np.load(tmp_path / "out" / f"{s}_labels.npy")) for s in SPLITS)
    assert total == sum(np.load(tmp_path / "out" / f"{s}_images.npy").shape[0] for s in SPLITS) == 90


@pytest.mark.parametrize(
    "name", ["truncated.png", "truncated.jpg", "empty.png", "notes.txt", "zero_width.png", "zero_width.wmf"]
)
def test_bad_file_fails_the_stage_when_on_error_is_fail(
    name: str, tmp_path: Path, make_image_folder: Callable, bad_files: dict[str, tuple[bytes, str]]
) -> None:
    data = make_image_folder(tmp_path / "data", per_class=4)
    (data / "c2" / name).write_bytes(bad_files[name][0])
    with pytest.raises(PreprocessError, match=re.escape(str(data / "c2" / name))):
        preprocess_folder(data, tmp_path / "out", params(on_error="fail"), SEED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_on_error_fail_names_every_bad_file(
    tmp_path: Path, make_image_folder: Callable, bad_files: dict[str, tuple[bytes, str]]
) -> None:
    """Found while hashing, reading headers and decoding alike: all of them in one error, not the first."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    names = ["empty.png", "notes.txt", "truncated.png", "truncated.jpg"]
    for i, name in enumerate(names):
        (data / f"c{i % 3}" / name).write_bytes(bad_files[name][0])
    with pytest.raises(PreprocessError, match=r"^4 unusable file\(s\): ") as err:
        preprocess_folder(data, tmp_path / "out", params(on_error="fail"), SEED)
    for i, name in enumerate(names):
        assert str(data / f"c{i % 3}" / name) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["truncated.png", "empty.png"])  # fails while decoding / while hashing
def test_failed_run_leaves_previous_output_untouched(
    bad: str, image_folder: Path, tmp_path: Path, bad_files: dict[str, tuple[bytes, str]]
) -> None:
    out = tmp_path / "artifacts" / "preprocessed"
    preprocess_folder(image_folder, out, params(), SEED)
    before = snapshot(out)
    shutil.copy(image_folder / "c0" / "img_000.png", image_folder / "c1" / "new.png")  # output would change
    (image_folder / "c2" / bad).write_bytes(bad_files[bad][0])

    with pytest.raises(PreprocessError, match=bad):
        preprocess_folder(image_folder, out, params(on_error="fail"), SEED)
    assert snapshot(out) == before
    assert [p.name for p in out.parent.iterdir()] == ["preprocessed"]  # no temporary folder left


def test_class_without_usable_image(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "broken").mkdir()
    (image_folder / "broken" / "notes.txt").write_text("no pixels here")
    with pytest.raises(PreprocessError, match="class 'broken' has no usable image"):
        preprocess_folder(image_folder, tmp_path / "out", params(), SEED)
    (image_folder / "broken" / "notes.txt").unlink()  # an empty class folder: same error
    with pytest.raises(PreprocessError, match="class 'broken' has no usable image"):
        preprocess_folder(image_folder, tmp_path / "out", params(), SEED)
    assert not (tmp_path / "out").exists()


def test_fewer_than_two_classes(tmp_path: Path, make_image_folder: Callable) -> None:
    data = make_image_folder(tmp_path / "data", classes=1, per_class=5)
    with pytest.raises(PreprocessError, match="found 1 class folder.*at least 2"):
        preprocess_folder(data, tmp_path / "out", params(), SEED)
    with pytest.raises(UserError, match="dataset folder not found"):
        preprocess_folder(tmp_path / "missing", tmp_path / "out", params(), SEED)


def test_tiny_class_says_what_to_change(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "tiny").mkdir()
    for name in ("img_000.png", "img_001.png"):  # 2 images cannot cover 3 splits
        shutil.copy(image_folder / "c0" / name, image_folder / "tiny" / name)
    with pytest.raises(PreprocessError, match=r"class 'tiny' has no (train|val|test) image") as err:
        preprocess_folder(image_folder, tmp_path / "out", params(), SEED)
    assert f"add images to {image_folder / 'tiny'}/" in str(err.value)
    assert "preprocess.val_fraction/test_fraction or base.seed" in str(err.value)
    # the minimum is in the message: 1/fraction to expect one image in the split, more to be likely
    assert re.search(r"with preprocess\.(val|test)_fraction 0\.\d+ a class needs \d+ images to expect one in "
                     r"(val|test), \d+ for a 95% chance", str(err.value)), str(err.value)


def test_images_needed_per_split() -> None:
    assert images_needed(0.1) == (10, 29)  # 0.9**28 = 0.052 > 0.05 >= 0.9**29 = 0.047
    assert images_needed(0.5) == (2, 5)


def test_hidden_files_and_folders_are_ignored(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "c0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    shutil.copytree(image_folder / "c1", image_folder / "c0" / ".hidden")
    shutil.copytree(image_folder / "c2", image_folder / ".cache")
    manifest = preprocess_folder(image_folder, tmp_path / "out", params(), SEED).model_dump()
    assert manifest["classes"] == ["c0", "c1", "c2"]
    assert manifest["skipped"] == []
    assert len(manifest["files"]) == 90
    assert not [row for row in manifest["files"] if "/." in row["path"] or row["path"].startswith(".")]


# ----------------------------------------------------------------------------- layouts and label order
def rows_split(manifest) -> dict[str, str]:
    return {row.path: row.split for row in manifest.files}


def test_pre_split_folders_are_kept_as_given(tmp_path: Path, make_image_folder: Callable) -> None:
    for seed, (split, count) in enumerate({"train": 8, "val": 3, "test": 4}.items()):
        make_image_folder(tmp_path / "data" / split, per_class=count, seed=seed)
    manifest = preprocess_folder(tmp_path / "data", tmp_path / "out", params(), SEED)
    assert manifest.split_source == {"train": "folder", "val": "folder", "test": "folder"}
    assert manifest.counts == {"train": 24, "val": 9, "test": 12}
    assert all(split == path.split("/")[0] for path, split in rows_split(manifest).items())
    labels = {s: np.load(tmp_path / "out" / f"{s}_labels.npy") for s in SPLITS}
    for row in manifest.files:
        assert row.path.split("/")[1] == row.class_name == manifest.classes[labels[row.split][row.index]]


def test_partial_pre_split_draws_only_the_missing_split(tmp_path: Path, make_image_folder: Callable) -> None:
    data = tmp_path / "data"
    make_image_folder(data / "train", per_class=30)
    make_image_folder(data / "test", per_class=5, seed=1)
    manifest = preprocess_folder(data, tmp_path / "out", params(), SEED)
    assert manifest.split_source == {"train": "folder", "val": "hash", "test": "folder"}
    before = rows_split(manifest)
    assert {p for p, s in before.items() if s == "test"} == {p for p in before if p.startswith("test/")}
    for row in manifest.files:  # val comes out of train only, by the hash split with test_fraction 0
        if row.path.startswith("train/"):
            assert row.split == assign_split(row.sha256, SEED, 0.2, 0.0)
    assert 0 < manifest.counts["val"] < 90 and manifest.counts["test"] == 15

    make_image_folder(data / "train", per_class=10, start=30)  # adding files never moves an existing one
    make_image_folder(data / "test", per_class=2, start=5, seed=1)
    after = rows_split(preprocess_folder(data, tmp_path / "out", params(), SEED))
    assert len(after) == len(before) + 36
    assert {path: after[path] for path in before} == before


def test_only_a_train_folder_draws_val_and_test(tmp_path: Path, make_image_folder: Callable) -> None:
    make_image_folder(tmp_path / "data" / "train", per_class=30)
    manifest = preprocess_folder(tmp_path / "data", tmp_path / "out", params(), SEED)
    assert manifest.split_source == {"train": "folder", "val": "hash", "test": "hash"}
    assert all(row.split == assign_split(row.sha256, SEED, 0.2, 0.2) for row in manifest.files)


def test_classes_file_and_param_give_the_label_order(image_folder: Path, tmp_path: Path) -> None:
    (image_folder / "classes.txt").write_text("c2\nc0\nc1\n")
    manifest = preprocess_folder(image_folder, tmp_path / "out", params(), SEED)
    assert (manifest.classes, manifest.classes_source) == (["c2", "c0", "c1"], "file")
    labels = {s: np.load(tmp_path / "out" / f"{s}_labels.npy") for s in SPLITS}
    for row in manifest.files:
        assert labels[row.split][row.index] == ["c2", "c0", "c1"].index(row.class_name)
    assert [np.bincount(labels[s], minlength=3).tolist() for s in SPLITS] == \
        [manifest.class_counts[s] for s in SPLITS]

    by_param = preprocess_folder(image_folder, tmp_path / "out", params(classes=["c1", "c2", "c0"]), SEED)
    assert (by_param.classes, by_param.classes_source) == (["c1", "c2", "c0"], "param")
    (image_folder / "classes.txt").write_text("c2\nc0\nc1\nc3\n")  # listed, but no images
    with pytest.raises(PreprocessError, match=re.escape(f"class 'c3' has no usable image: add images to "
                                                        f"{image_folder / 'c3'}/ or remove it from "
                                                        f"{image_folder / 'classes.txt'}")):
        preprocess_folder(image_folder, tmp_path / "out", params(), SEED)


# ----------------------------------------------------------------------------- incremental
def record_calls(monkeypatch: pytest.MonkeyPatch, log: Path) -> Callable[[str], list[str]]:
    """Make images.preprocess (a decode) and images.open_image (any read of an image) append the file
    they were given to ``log``: the stage's workers are forked, so they inherit the patch, and a
    shared file brings their calls back. Returns ``calls(kind)``: sorted file names."""
    for kind in ("preprocess", "open_image"):
        original = getattr(images, kind)

        def wrapper(source, *args, _original=original, _kind=kind, **kwargs):
            with open(log, "a") as handle:
                handle.write(f"{_kind} {Path(source).relative_to(log.parent / 'data').as_posix()}\n")
            return _original(source, *args, **kwargs)

        monkeypatch.setattr(images, kind, wrapper)

    def calls(kind: str) -> list[str]:
        lines = log.read_text().splitlines() if log.exists() else []
        return sorted({line.split(" ", 1)[1] for line in lines if line.startswith(f"{kind} ")})

    return calls


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_incremental_run_decodes_only_touched_files_and_equals_a_fresh_run(
    image_folder: Path, tmp_path: Path, make_image_folder: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    same_size = image_folder / "c1" / "same_size.png"  # uncompressed: the size depends on the pixels' shape only
    images.Image.fromarray(np.full((12, 12, 3), (40, 200, 40), np.uint8)).save(same_size, compress_level=0)
    preprocess_folder(image_folder, out, params(), SEED, cache)

    make_image_folder(image_folder, per_class=2, start=30)  # 6 new files
    added = [f"c{k}/img_{i:03d}.png" for k in range(3) for i in (30, 31)]
    changed = ["c0/img_003.png", "c2/img_010.png", "c1/same_size.png"]
    for rel in changed[:2]:  # new content under the same name
        pixels = np.asarray(images.open_image(image_folder / rel).convert("RGB"))
        images.Image.fromarray(255 - pixels).save(image_folder / rel)
    # New content in place with the same size and the old mtime (as `cp -p` leaves it): only the
    # ctime tells, so the file is read again rather than trusted by size and mtime.
    before = same_size.stat()
    images.Image.fromarray(np.full((12, 12, 3), (60, 190, 50), np.uint8)).save(same_size, compress_level=0)
    os.utime(same_size, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (same_size.stat().st_size, same_size.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    for rel in ["c1/img_007.png", "c2/img_000.png"]:
        (image_folder / rel).unlink()
    calls = record_calls(monkeypatch, tmp_path / "calls.log")
    incremental = preprocess_folder(image_folder, out, params(), SEED, cache)

    assert calls("preprocess") == sorted(added + changed)  # decoded: only the touched files
    assert calls("open_image") == sorted(added + changed)  # not even a header of the others
    assert len(incremental.files) == 91 + 6 - 2
    for name in ("train_images.npy", "val_images.npy", "test_images.npy"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o444  # hard-linked into the cache: read-only
    monkeypatch.undo()
    fresh = preprocess_folder(image_folder, tmp_path / "fresh", params(), SEED)  # no cache: decodes all
    assert fresh == incremental
    assert files_of(out) == files_of(tmp_path / "fresh")  # arrays, labels and manifest, byte for byte

    calls = record_calls(monkeypatch, tmp_path / "again.log")
    assert preprocess_folder(image_folder, out, params(), SEED, cache) == fresh
    assert calls("preprocess") == [] and calls("open_image") == []
    assert files_of(out) == files_of(tmp_path / "fresh")
    (cached,) = cache.glob("*/train_images.npy")  # unchanged splits are links to the last arrays, not copies
    assert (out / "train_images.npy").stat().st_ino == cached.stat().st_ino


def test_cache_is_keyed_by_the_params_and_keeps_two_sets(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    preprocess_folder(image_folder, out, params(), SEED, cache)
    calls = record_calls(monkeypatch, tmp_path / "size20.log")
    resized = preprocess_folder(image_folder, out, params(image_size=20), SEED, cache)
    assert len(calls("preprocess")) == 90 and resized.image_size == 20
    calls = record_calls(monkeypatch, tmp_path / "size16.log")
    preprocess_folder(image_folder, out, params(), SEED, cache)  # the first set is still there
    assert calls("preprocess") == []
    calls = record_calls(monkeypatch, tmp_path / "channels.log")
    preprocess_folder(image_folder, out, params(channels=1), SEED, cache)
    assert len(calls("preprocess")) == 90
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2  # bounded: the 2 most recent sets
    assert len(list(cache.glob("files-*.npy"))) == 1


def test_a_damaged_cache_is_ignored(image_folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = preprocess_folder(image_folder, tmp_path / "out", params(), SEED, cache)
    (index,) = cache.glob("*/index.npy")
    index.write_bytes(b"not an array")
    assert preprocess_folder(image_folder, tmp_path / "out", params(), SEED, cache) == first


def test_progress_lines_when_output_is_a_pipe(image_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"preprocess": {"image_size": 16, "val_fraction": 0.2,
                                                                         "test_fraction": 0.2, "workers": 2}}))
    env = {**os.environ, "CNN_PROGRESS_INTERVAL": "0"}
    done = subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--data", str(image_folder), "--out",
                           str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml"), "--cache", ""],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr
    decode = [line for line in lines if line.startswith("decode: ")]
    assert len(decode) >= 10  # a line per interval (0 s here), not one bar redrawn in place
    # the rate is img/s, or s/img when an image takes over a second (a busy machine)
    assert re.fullmatch(r"decode: 90/90 img \(100%\), +(?:[\d.]+img/s|[\d.]+s/img), elapsed \d\d:\d\d, ETA 00:00",
                        decode[-1])
    assert any(line.startswith("hash: 90/90 img") for line in lines)


def dvc(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def git(*args: str, cwd: Path) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.com"]
    done = subprocess.run(["git", *identity, *args], cwd=cwd, check=True, capture_output=True, text=True)
    return done.stdout


@pytest.mark.slow
def test_dvc_repro_preprocess(tmp_path: Path, make_image_folder: Callable) -> None:
    repo = tmp_path / "repo"
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).splitlines()
    for rel in listed:  # the working-tree version of every tracked (or new, unignored) file
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    assert (repo / "dvc.yaml").is_file() and (repo / ".dvc" / "config").is_file()
    settings = yaml.safe_load((repo / "params.yaml").read_text())
    # 20 images per class: 25 % val and test keep every split of every class non-empty.
    settings["preprocess"].update(image_size=16, val_fraction=0.25, test_fraction=0.25, workers=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "-m", "copy", cwd=repo)

    make_image_folder(repo / "data", classes=3, per_class=20)
    dvc("add", "data", cwd=repo)
    out = dvc("repro", "preprocess", cwd=repo)
    assert "Running stage 'preprocess'" in out

    result = repo / "artifacts" / "preprocessed"
    manifest = json.loads((result / "manifest.json").read_text())
    assert (manifest["image_size"], manifest["channels"], sum(manifest["counts"].values())) == (16, 3, 60)
    for split in SPLITS:
        assert np.load(result / f"{split}_images.npy").shape == (manifest["counts"][split], 3, 16, 16)
    assert "preprocess" in yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert json.loads(dvc("status", "preprocess", "--json", cwd=repo)) == {}

    mtime = (result / "manifest.json").stat().st_mtime_ns
    again = dvc("repro", "preprocess", cwd=repo)
    assert "Stage 'preprocess' didn't change, skipping" in again
    assert "Running stage" not in again
    assert (result / "manifest.json").stat().st_mtime_ns == mtime
