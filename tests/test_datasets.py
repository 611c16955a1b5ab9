"""Every reader on a generated copy of its exact on-disk format, and the packed cache."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from negmargin.config import Config
from negmargin.datasets import load_split, read_source
from negmargin.datasets.cache import PackedSplit, StorePolicy, estimate_bytes, prepare
from negmargin.datasets.cub import split_classes
from negmargin.datasets.folder import split_by_fraction
from negmargin.datasets.mini_imagenet import original_index
from negmargin.datasets.omniglot import VAL_ALPHABETS
from negmargin.errors import DataError
from negmargin.fileio import MIN_FREE_BYTES, DiskFullError
from negmargin.imageio import read_image

DATA = Path(__file__).parent / "data"
CUB_NAMES = (DATA / "cub_classes.txt").read_text().split()


def save_image(path: Path, rng, size=(12, 10), mode="RGB", fmt=None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return arr


def cfg_for(dataset: str, root: Path, tmp_path: Path, **data) -> Config:
    raw = {
        "data": {
            "dataset": dataset,
            "root": str(root),
            "cache_dir": str(tmp_path / "cache"),
            "image_size": 8,
            "train_store_size": 0,
            "prepare_workers": 1,
            **data,
        }
    }
    return Config.from_dict(raw).validate()


# ------------------------------------------------------------------ CUB


def test_cub_split_rule_on_the_real_class_names():
    train, val, test = (split_classes(CUB_NAMES, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (100, 50, 50)
    assert set(train) | set(val) | set(test) == set(CUB_NAMES) and not set(train) & set(val)
    assert train[:3] == ["001.Black_footed_Albatross", "003.Sooty_Albatross", "005.Crested_Auklet"]
    assert val[:3] == ["002.Laysan_Albatross", "006.Least_Auklet", "010.Red_winged_Blackbird"]
    assert test[:3] == ["004.Groove_billed_Ani", "008.Rhinoceros_Auklet", "012.Yellow_headed_Blackbird"]
    assert test[-1] == "200.Common_Yellowthroat" and val[-1] == "198.Rock_Wren"
    assert split_classes(list(reversed(CUB_NAMES)), "val") == val  # the rule sorts first


def make_cub(root: Path, per_class=2) -> Path:
    rng = np.random.default_rng(0)
    for name in CUB_NAMES:
        for i in range(per_class):
            save_image(root / "images" / name / f"{name.split('.')[1]}_{i:04d}.jpg", rng, (20, 15))
    return root


def test_cub_layout_reads_with_counts(tmp_path):
    root = make_cub(tmp_path / "CUB_200_2011")
    for split, n in (("train", 100), ("val", 50), ("test", 50)):
        src = read_source(cfg_for("cub", root, tmp_path), split)
        assert len(src.class_names) == n and len(src) == 2 * n
        assert np.bincount(src.labels).tolist() == [2] * n


def test_cub_missing_or_wrong_folder(tmp_path):
    with pytest.raises(DataError, match=r"CUB image folder '.*images' does not exist.*CUB_200_2011.tgz"):
        read_source(cfg_for("cub", tmp_path / "nothing", tmp_path), "train")
    (tmp_path / "c" / "images" / "001.A").mkdir(parents=True)
    with pytest.raises(DataError, match="has 1 class folders, expected 200"):
        read_source(cfg_for("cub", tmp_path / "c", tmp_path), "train")


# ------------------------------------------------------------------ miniImageNet

WNIDS = {"train": ["n01532829", "n01558993"], "val": ["n01855672"], "test": ["n01930112", "n01981276"]}


def write_csvs(root: Path, per_class=3) -> dict[str, list[tuple[str, str]]]:
    rows = {}
    for split, wnids in WNIDS.items():
        rows[split] = [(f"{w}{i:08d}.jpg", w) for w in wnids for i in range(1, per_class + 1)]
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows[split])
    return rows


def test_mini_index_mapping_worked_example():
    assert original_index("n0153282900000005.jpg") == 4  # last five digits, 1-based
    assert original_index("n0153282900000600.jpg") == 599


@pytest.mark.parametrize("layout", ["resized", "original", "folders"])
def test_mini_imagenet_layouts(tmp_path, layout):
    root = tmp_path / "mini_imagenet"
    root.mkdir()
    rows = write_csvs(root)
    rng = np.random.default_rng(1)
    expected = {}
    for split in WNIDS:
        for filename, wnid in rows[split]:
            if layout == "resized":
                expected[filename] = save_image(root / "images" / filename, rng, fmt="PNG")
            elif layout == "folders":
                expected[filename] = save_image(root / split / wnid / filename, rng, fmt="PNG")
    if layout == "original":
        # Class folders with out-of-order numbers: sorted by the number after the last '_'.
        for wnid in sum(WNIDS.values(), []):
            for n in (25, 3, 10):
                save_image(root / "images" / wnid / f"{wnid}_{n}.JPEG", rng, fmt="PNG")
    for split in WNIDS:
        src = read_source(cfg_for("mini_imagenet", root, tmp_path), split)
        assert src.class_names == WNIDS[split] and len(src) == 3 * len(WNIDS[split])
        assert {"resized": "pre-resized", "original": "original ImageNet", "folders": "class folders"}[
            layout
        ] in src.layout
        if layout == "original":
            # csv row ...00000002.jpg → the 2nd file by number: _10
            assert Path(src.items[1]).name == f"{WNIDS[split][0]}_10.JPEG"
            assert Path(src.items[2]).name == f"{WNIDS[split][0]}_25.JPEG"
        else:
            for (filename, _), path in zip(rows[split], src.items):
                assert Path(path).name == filename
                assert np.array_equal(read_image(path), expected[filename])


def test_mini_imagenet_base_holdout_splits_each_class_and_keeps_its_own_cache(tmp_path):
    root = tmp_path / "mini_imagenet"
    root.mkdir()
    rows = write_csvs(root, per_class=5)
    rng = np.random.default_rng(2)
    for split in WNIDS:
        for filename, _ in rows[split]:
            save_image(root / "images" / filename, rng, fmt="PNG")
    plain = cfg_for("mini_imagenet", root, tmp_path)
    held = cfg_for("mini_imagenet", root, tmp_path, options={"base_holdout": 2})
    names = lambda src: [Path(p).name for p in src.items]  # noqa: E731
    full = read_source(plain, "train")
    train, holdout = read_source(held, "train"), read_source(held, "train_holdout")
    # the last 2 csv rows of every class are held out; together they are the whole train.csv
    assert names(holdout) == [f"{w}{i:08d}.jpg" for w in WNIDS["train"] for i in (4, 5)]
    assert names(train) == [f"{w}{i:08d}.jpg" for w in WNIDS["train"] for i in (1, 2, 3)]
    assert sorted(names(train) + names(holdout)) == sorted(names(full))
    assert holdout.class_names == train.class_names == WNIDS["train"]
    assert list(holdout.labels) == [0, 0, 1, 1]
    assert read_source(held, "val").items == read_source(plain, "val").items  # only train is split
    # the full and the reduced train split are cached side by side (no rebuild when switching)
    packed_full, packed_train = (
        load_split(plain, "train", progress=False),
        load_split(held, "train", progress=False),
    )
    assert (len(packed_full), len(packed_train)) == (10, 6)
    assert packed_full.folder != packed_train.folder
    assert len(load_split(plain, "train", progress=False)) == 10
    with pytest.raises(DataError, match="train_holdout needs data.options.base_holdout"):
        read_source(plain, "train_holdout")
    with pytest.raises(DataError, match="base_holdout=5 leaves no training image"):
        read_source(cfg_for("mini_imagenet", root, tmp_path, options={"base_holdout": 5}), "train")
    with pytest.raises(DataError, match="takes the data.options base_holdout only"):
        read_source(cfg_for("mini_imagenet", root, tmp_path, options={"rotations": True}), "train")


def test_mini_imagenet_errors(tmp_path):
    root = tmp_path / "m"
    with pytest.raises(DataError, match="miniImageNet root .* does not exist"):
        read_source(cfg_for("mini_imagenet", root, tmp_path), "train")
    root.mkdir()
    with pytest.raises(DataError, match=r"train.csv' does not exist.*Ravi"):
        read_source(cfg_for("mini_imagenet", root, tmp_path), "train")
    rows = write_csvs(root)
    with pytest.raises(DataError, match="cannot find the image .* in any known layout"):
        read_source(cfg_for("mini_imagenet", root, tmp_path), "train")
    rng = np.random.default_rng(0)
    for filename, wnid in rows["train"]:
        if wnid == "n01532829":
            save_image(root / "images" / filename, rng, fmt="PNG")
    with pytest.raises(DataError, match=r"no images found for class\(es\) n01558993"):
        read_source(cfg_for("mini_imagenet", root, tmp_path), "train")
    with open(root / "val.csv", "a") as f:
        f.write("n0153282900000001.jpg,n01532829\n")
    with pytest.raises(DataError, match="'n01532829' is in both the train and the val split"):
        read_source(cfg_for("mini_imagenet", root, tmp_path), "train")


# ------------------------------------------------------------------ tieredImageNet


def png_bytes(arr: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def make_tiered(root: Path, split: str, n_classes=3, per_class=4) -> list[np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) for _ in range(n_classes * per_class)]
    with open(root / f"{split}_images_png.pkl", "wb") as f:
        pickle.dump([png_bytes(a) for a in arrays], f, protocol=2)
    labels = {
        "label_specific": np.repeat(np.arange(n_classes), per_class),
        "label_general": np.repeat(np.arange(n_classes) % 2, per_class),
        "label_specific_str": [f"class {i}" for i in range(n_classes)],
        "label_general_str": ["animal", "object"],
    }
    with open(root / f"{split}_labels.pkl", "wb") as f:
        pickle.dump(labels, f, protocol=2)
    return arrays


def test_tiered_pickles_round_trip_through_cache(tmp_path):
    root = tmp_path / "tiered_imagenet"
    arrays = make_tiered(root, "test")
    cfg = cfg_for("tiered_imagenet", root, tmp_path, test_resize=8)
    src = read_source(cfg, "test")
    assert src.class_names == ["class 0", "class 1", "class 2"]
    assert src.metadata["general_categories"] == ["animal", "object", "animal"]
    packed = prepare(src, StorePolicy(0, False, "pil", 3), tmp_path / "c", workers=1, progress=False)
    assert len(packed) == 12 and packed.metadata["general_categories"][1] == "object"
    for i, a in enumerate(arrays):
        assert np.array_equal(packed.image(i), a)
    assert src.decode._items == [None] * 12  # every PNG string released once decoded
    # the free-space estimate (run by prepare, above) reads the PNGs' headers without taking them
    fresh = read_source(cfg, "test")
    stored = (packed.folder / "images.u8").stat().st_size
    assert estimate_bytes(fresh, StorePolicy(0, False, "pil", 3)) == int(1.25 * stored)
    assert all(item is not None for item in fresh.decode._items)


def test_cache_size_estimate_follows_the_stored_sizes(tmp_path, monkeypatch):
    """The free-space check asks for the stored bytes (+25%), not a 256-px bound: an
    84-px release is stored at 84 px (the bound would ask ~12x too much), a large image
    is shrunk to the 256-px short side first."""
    rng = np.random.default_rng(0)
    sizes = [(84, 84)] * 6 + [(300, 400), (500, 375)]  # (H, W)
    for i, (h, w) in enumerate(sizes):
        path = tmp_path / "src" / f"c{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    src = read_source(
        cfg_for("folder", tmp_path / "src", tmp_path, options={"split_fractions": (1, 0, 0)}), "train"
    )
    policy = StorePolicy(256, False, "pil", 3)
    packed = prepare(src, policy, tmp_path / "c", workers=1, progress=False)
    stored = (packed.folder / "images.u8").stat().st_size
    assert stored == 3 * (6 * 84 * 84 + 256 * 341 + 341 * 256)
    assert estimate_bytes(src, policy) == int(1.25 * stored)  # all 8 sampled
    assert estimate_bytes(src, policy, sample=2) < 3 * stored  # first and last image only
    # prepare asks the disk for the estimate: room for 2x the stored bytes is enough
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=MIN_FREE_BYTES + 2 * stored))
    prepare(src, policy, tmp_path / "again", workers=1, progress=False)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=MIN_FREE_BYTES + stored))
    with pytest.raises(DiskFullError, match="not enough disk space to write the image cache of folder/train"):
        prepare(src, policy, tmp_path / "full", workers=1, progress=False)
    (tmp_path / "src" / "c0" / "0.png").write_bytes(b"not a png")
    (tmp_path / "src" / "c1" / "7.png").write_bytes(b"not a png")
    assert estimate_bytes(src, policy, sample=2) == int(8 * 256 * 256 * 4 / 3 * 3)  # no header: the bound


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/negmargin-pwned",))


def test_tiered_pickle_with_code_is_refused(tmp_path):
    root = tmp_path / "t"
    make_tiered(root, "train")
    with open(root / "train_labels.pkl", "wb") as f:
        pickle.dump({"label_specific": Boom()}, f)
    with pytest.raises(DataError, match="refusing to load posix.system"):
        read_source(cfg_for("tiered_imagenet", root, tmp_path), "train")
    assert not Path("/tmp/negmargin-pwned").exists()


def test_tiered_missing_files(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(DataError, match=r"train_images_png.pkl' does not exist.*Ren et al"):
        read_source(cfg_for("tiered_imagenet", tmp_path / "t", tmp_path), "train")


# ------------------------------------------------------------------ Omniglot


def make_omniglot(root: Path) -> None:
    rng = np.random.default_rng(3)
    for group, alphabets, chars in (
        ("images_background", ["Latin", "Greek"], 3),
        ("images_evaluation", [*VAL_ALPHABETS, "Tibetan", "ULOG"], 2),
    ):
        for a in alphabets:
            for c in range(1, chars + 1):
                for d in range(1, 4):
                    img = rng.random((105, 105)) > 0.1
                    path = root / group / a / f"character{c:02d}" / f"{c:04d}_{d:02d}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(img).save(path)  # mode "1", as the real files


def test_omniglot_splits_rotations_and_grayscale(tmp_path):
    root = tmp_path / "omniglot"
    make_omniglot(root)
    cfg = cfg_for(
        "omniglot", root, tmp_path, channels=1, mean=(200.0,), std=(60.0,), image_size=28, test_resize=28
    )
    train = read_source(cfg, "train")
    assert len(train.class_names) == 6 and len(train) == 18
    val, test = read_source(cfg, "val"), read_source(cfg, "test")
    assert {n.split("/")[0] for n in val.class_names} == set(VAL_ALPHABETS)
    assert {n.split("/")[0] for n in test.class_names} == {"Tibetan", "ULOG"}
    cfg = replace(cfg, data=replace(cfg.data, options={"rotations": True}))
    rot = read_source(cfg, "train")
    assert len(rot.class_names) == 24 and rot.class_names[6] == "Greek/character01@rot90"
    packed = prepare(rot, StorePolicy(28, False, "pil", 1), tmp_path / "c", workers=1, progress=False)
    first = read_image(rot.items[0], 1)
    assert packed.image(0).shape == (28, 28, 1)
    small = PackedSplit(packed.folder)
    # class 6 is class 0 turned by 90°: the stored pixels are the rotated ones
    turned = np.flatnonzero(rot.labels == 6)[0]
    assert rot.rotations[turned] == 1 and np.array_equal(rot.items[turned], rot.items[0])
    assert not np.array_equal(small.image(turned), small.image(0)) and first.shape == (105, 105, 1)


# ------------------------------------------------------------------ your own images


def test_every_common_mode_and_exif_orientation(tmp_path):
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)
    paths = {}
    for mode in ("RGB", "L", "RGBA", "P", "CMYK"):
        p = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.fromarray(arr).convert(mode).save(p)
        paths[mode] = p
    sixteen = tmp_path / "16bit.png"
    Image.fromarray(arr[:, :, 0].astype(np.uint16) * 257).save(sixteen)
    for p in [*paths.values(), sixteen]:
        out = read_image(p, 3)
        assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    assert np.array_equal(read_image(paths["RGB"]), arr)
    assert (
        np.abs(read_image(sixteen, 1)[:, :, 0].astype(int) - arr[:, :, 0]).max() <= 1
    )  # scaled, not clipped
    rgba = Image.fromarray(arr).convert("RGBA")
    rgba.putalpha(0)
    rgba.save(tmp_path / "clear.png")
    assert (read_image(tmp_path / "clear.png") == 255).all()  # transparent → white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(arr).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (20, 10, 3)


def make_folder(root: Path, classes=6, per_class=3) -> None:
    rng = np.random.default_rng(5)
    for c in range(classes):
        for i in range(per_class):
            save_image(root / f"cls{c}" / f"{i}.png", rng)
    (root / "cls0" / "notes.txt").write_text("not an image; ignored by the dataset reader")


def test_folder_split_by_files_and_by_fraction(tmp_path):
    root = tmp_path / "mine"
    make_folder(root)
    cfg = cfg_for("folder", root, tmp_path, options={"split_fractions": (0.5, 0.25, 0.25), "split_seed": 1})
    names = {s: read_source(cfg, s).class_names for s in ("train", "val", "test")}
    assert sorted(sum(names.values(), [])) == [f"cls{i}" for i in range(6)]  # each class in one split
    assert names == {s: read_source(cfg, s).class_names for s in ("train", "val", "test")}  # seeded
    assert names == {"train": ["cls3", "cls4"], "val": ["cls0", "cls1", "cls2"], "test": ["cls5"]}
    for s, listed in (("train", "cls0\ncls1\ncls2"), ("val", "cls3"), ("test", "cls4\ncls5")):
        (root / f"{s}.txt").write_text(listed + "\n")
    cfg = cfg_for("folder", root, tmp_path)
    train = read_source(cfg, "train")
    assert train.class_names == ["cls0", "cls1", "cls2"] and len(train) == 9  # notes.txt skipped, and said
    assert "skipped in the class folders: 1 file(s) without an image extension" in train.layout
    (root / "test.txt").write_text("cls4\ncls0\n")
    with pytest.raises(DataError, match="'cls0' is in both the train and the test split"):
        read_source(cfg, "train")
    (root / "test.txt").write_text("cls4\ncls9\n")
    with pytest.raises(DataError, match="class 'cls9' of test.txt has no folder"):
        read_source(cfg, "test")


def test_empty_class_folder_is_named(tmp_path):
    root = tmp_path / "mine"
    make_folder(root)
    (root / "cls6").mkdir()
    cfg = cfg_for("folder", root, tmp_path, options={"split_fractions": (1, 0, 0)})
    with pytest.raises(DataError, match=r"class folder '.*cls6' has no image files"):
        read_source(cfg, "train")


# ------------------------------------------------------------------ the cache


def test_cache_round_trips_pixels_and_reuses_itself(tmp_path):
    root = tmp_path / "mine"
    make_folder(root)
    cfg = cfg_for("folder", root, tmp_path, options={"split_fractions": (1, 0, 0)})
    packed = load_split(cfg, "train", progress=False)
    src = read_source(cfg, "train")
    for i in range(len(packed)):
        assert np.array_equal(packed.image(i), read_image(src.items[i]))  # exact at the stored size
    assert packed.manifest["count"] == 18 and packed.manifest["fingerprint"] == src.fingerprint
    stamp = (packed.folder / "images.u8").stat().st_mtime_ns
    again = load_split(cfg, "train", progress=False)
    assert (again.folder / "images.u8").stat().st_mtime_ns == stamp  # unchanged inputs: nothing done
    save_image(root / "cls1" / "extra.png", np.random.default_rng(9))
    changed = load_split(cfg, "train", progress=False)
    assert len(changed) == 19


def test_cache_resizes_train_and_test_splits_as_documented(tmp_path):
    rng = np.random.default_rng(6)
    root = tmp_path / "big"
    for c in range(3):
        for i in range(2):
            save_image(root / f"c{c}" / f"{i}.png", rng, size=(200, 100))
    cfg = cfg_for(
        "folder", root, tmp_path, image_size=32, train_store_size=64, options={"split_fractions": (1, 0, 0)}
    )
    assert load_split(cfg, "train", progress=False).image(0).shape == (64, 128, 3)  # short side 64
    cfg = replace(cfg, data=replace(cfg.data, options={"split_fractions": (0, 0, 1)}))
    assert load_split(cfg, "test", progress=False).image(0).shape == (36, 72, 3)  # int(32·1.15) = 36


def test_corrupt_image_is_listed_and_can_be_skipped(tmp_path):
    root = tmp_path / "mine"
    make_folder(root)
    (root / "cls2" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "cls4" / "empty.png").write_bytes(b"")
    cfg = cfg_for("folder", root, tmp_path, options={"split_fractions": (1, 0, 0)})
    with pytest.raises(DataError) as err:
        load_split(cfg, "train", progress=False)
    msg = str(err.value)
    assert "2 unreadable image(s)" in msg and "broken.jpg" in msg and "empty.png" in msg
    assert "skip_bad_images" in msg
    cfg = replace(cfg, data=replace(cfg.data, skip_bad_images=True))
    assert len(load_split(cfg, "train", progress=False)) == 18


def test_parallel_preparation_gives_the_same_cache(tmp_path):
    rng = np.random.default_rng(7)
    root = tmp_path / "many"
    for c in range(4):
        for i in range(140):
            save_image(root / f"c{c}" / f"{i}.png", rng, size=(9, 7))
    cfg = cfg_for("folder", root, tmp_path, options={"split_fractions": (1, 0, 0)})
    src = read_source(cfg, "train")
    one = prepare(src, StorePolicy(0, False, "pil", 3), tmp_path / "a", workers=1, progress=False)
    two = prepare(src, StorePolicy(0, False, "pil", 3), tmp_path / "b", workers=2, progress=False)
    assert np.array_equal(np.asarray(one.buffer), np.asarray(two.buffer))
    assert np.array_equal(one.labels, two.labels)


def test_prepare_command(tmp_path, capsys):
    from negmargin import cli

    root = tmp_path / "mine"
    make_folder(root)
    args = [
        "prepare",
        "folder",
        "--root",
        str(root),
        "--splits",
        "train",
        "--cfg-options",
        "data.options={'split_fractions': (1, 0, 0)}",
        f"data.cache_dir='{tmp_path / 'cache'}'",
    ]
    assert cli.main(args) == 0
    assert "train: 18 images in" in capsys.readouterr().out
    (root / "cls3" / "bad.png").write_bytes(b"junk")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: 1 unreadable image(s)" in err and "bad.png" in err.split("error:")[1]
    assert cli.main([*args, "--skip-bad-images"]) == 0


def test_prepare_omniglot_reads_the_omniglot_config(tmp_path, capsys):
    """Without --config, `negmargin prepare omniglot` stores what the Omniglot config trains on:
    28×28 grayscale (not the defaults' RGB at short side 256)."""
    from negmargin import cli

    root = tmp_path / "omniglot"
    make_omniglot(root)
    args = ["prepare", "omniglot", "--root", str(root), "--splits", "train", "val"]
    assert cli.main([*args, "--cfg-options", f"data.cache_dir='{tmp_path / 'cache'}'"]) == 0
    out = capsys.readouterr().out
    assert "train: 18 images in" in out and "val: 30 images in" in out  # 5 alphabets × 2 × 3
    folder = next((tmp_path / "cache").glob("omniglot-train-*"))
    assert PackedSplit(folder).image(0).shape == (28, 28, 1)


def test_fraction_split_never_moves_a_class_when_others_are_added_or_renamed():
    names = [f"species_{i:03d}" for i in range(300)]
    before = split_by_fraction(names, (0.6, 0.2, 0.2), 0)
    assert 150 < len(before["train"]) < 210 and 35 < len(before["val"]) < 85  # the proportions, on average
    after = split_by_fraction([*names[1:], "species_000_renamed", "new_species"], (0.6, 0.2, 0.2), 0)
    for split in before:
        moved = set(before[split]) - set(after[split]) - {"species_000"}
        assert not moved, (split, moved)
    with pytest.raises(DataError, match="split_seed must be an integer, got 'abc'"):
        split_by_fraction(names, (0.6, 0.2, 0.2), "abc")
