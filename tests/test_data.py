"""Tests for core.data: synthetic benchmark, saliency sources, VOC-layout reader, paired transforms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data import (
    DEFAULT_SALIENCY,
    IMAGENET_MEAN,
    PRESETS,
    SALIENCY_SOURCES,
    DataError,
    VOCDataset,
    denormalize,
    generate,
    normalize,
    paired_random_transform,
)
from core.data.synthetic import VOC_CLASSES, ensure_generated, main, render_image, voc_palette


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "smoke"
    summary = generate(out, "smoke", seed=0)
    return out, summary


# ------------------------------------------------------------------ synthetic generator
def test_layout_written(smoke):
    out, summary = smoke
    p = PRESETS["smoke"]
    train = (out / "ImageSets/Segmentation/train.txt").read_text().split()
    val = (out / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(train) == p["n_train"] and len(val) == p["n_val"] and not set(train) & set(val)
    assert (out / "classes.txt").read_text().split() == VOC_CLASSES and len(VOC_CLASSES) == 21
    labels = json.loads((out / "labels.json").read_text())
    assert set(labels) == set(train) | set(val)
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in train[:3] + val[:3]:
        im = Image.open(out / "JPEGImages" / f"{name}.jpg")
        assert im.format == "JPEG" and im.size == (p["size"], p["size"])
        m = Image.open(out / "SegmentationClass" / f"{name}.png")
        assert m.mode == "P" and m.size == im.size and m.getpalette()[:63] == voc_palette()[:63]
        for s in SALIENCY_SOURCES:
            sal = Image.open(out / "saliency" / s / f"{name}.png")
            assert sal.mode == "L" and sal.size == im.size
    assert summary["splits"]["train"]["images"] == p["n_train"]
    assert (
        set(summary["saliency"]) == set(SALIENCY_SOURCES) and summary["default_saliency"] == DEFAULT_SALIENCY
    )
    assert 1 <= summary["splits"]["train"]["mean_objects"] <= 3
    assert p["size"] % 8 == 0 and PRESETS["default"]["size"] % 8 == 0


@pytest.mark.slow
def test_cli_prints_summary(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--preset", "smoke", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "F(beta2=.3)" in text and "cue covers" in text and DEFAULT_SALIENCY in text
    assert (tmp_path / "d" / "summary.json").is_file()


@pytest.mark.slow
def test_deterministic(smoke, tmp_path):
    out, _ = smoke
    generate(tmp_path / "again", "smoke", seed=0)
    a, b = _files(out), _files(tmp_path / "again")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    generate(tmp_path / "other", "smoke", seed=1)
    c = _files(tmp_path / "other")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert all(a[k] != c[k] for k in jpgs)


@pytest.mark.slow
def test_ensure_generated_reuses(smoke, tmp_path):
    d = tmp_path / "ens"
    s1 = ensure_generated(d, "smoke", 0)
    stamp = (d / "summary.json").stat().st_mtime_ns
    assert ensure_generated(d, "smoke", 0) == s1 and (d / "summary.json").stat().st_mtime_ns == stamp
    assert _files(d) == _files(smoke[0])
    assert ensure_generated(d, "smoke", 1)["seed"] == 1


def test_labels_match_masks_and_ignore_band(smoke):
    out, _ = smoke
    labels = json.loads((out / "labels.json").read_text())
    n_classes = []
    for name, ids in labels.items():
        m = np.asarray(Image.open(out / "SegmentationClass" / f"{name}.png"))
        present = sorted(int(c) for c in np.unique(m) if c not in (0, 255))
        assert present == ids, name
        assert all(1 <= c <= 20 for c in ids)
        assert (m == 255).any()  # boundary band
        assert (m == 255).sum() < ((m != 0) & (m != 255)).sum()  # ... and a thin one
        n_classes.append(len(ids))
    assert 1 <= min(n_classes) and max(n_classes) <= 3


def test_cue_covers_minority_of_object():
    p = dict(PRESETS["smoke"])
    fracs, counts = [], []
    for i in range(12):
        img, seg, fg, info = render_image(np.random.default_rng(i), p)
        assert img.shape == (p["size"], p["size"], 3) and 0 <= img.min() and img.max() <= 1
        assert fg.sum() > 0 and (seg[~fg] != 255).any()
        fracs += info["cue_fracs"]
        counts.append(info["n_objects"])
    assert all(0.15 <= f <= 0.40 for f in fracs)
    assert 0.2 <= np.mean(fracs) <= 0.35
    assert set(counts) <= {1, 2, 3}


def test_saliency_sources_differ_in_quality(smoke):
    _, summary = smoke
    sal = summary["saliency"]
    assert len(sal) >= 3
    f = {k: v["fmeasure"] for k, v in sal.items()}
    mae = {k: v["mae"] for k, v in sal.items()}
    assert max(f.values()) - min(f.values()) > 0.1
    assert min(mae, key=mae.get) == DEFAULT_SALIENCY
    assert f[DEFAULT_SALIENCY] > f["sr"] + 0.1


def test_saliency_sources_contract():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    img = (40 + ndimage.gaussian_filter(rng.random((40, 56, 3)), (3, 3, 0)) * 60).astype(np.uint8)
    img[12:28, 20:40] = (230, 120, 30)  # a salient square
    fg = np.zeros((40, 56), bool)
    fg[12:28, 20:40] = True
    for name, fn in SALIENCY_SOURCES.items():
        s = fn(img)
        assert s.shape == (40, 56) and s.dtype == np.float32, name
        assert 0.0 <= s.min() and s.max() <= 1.0, name
        assert s[fg].mean() > s[~fg].mean(), name


# ------------------------------------------------------------------ VOC-layout reader
def _png(path: Path, arr: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if mode == "P":
        im = im.convert("P")
        im.putpalette(voc_palette())
    im.save(path)


def _voc_folder(root: Path, n: int = 4, size=(24, 32)) -> list[str]:
    """A tiny VOC 2012 + SBD folder: masks for names 0,1 in SegmentationClass (mode P), names 2,3 in
    SegmentationClassAug (mode L), name 0 in both with a different mask in Aug; train_aug.txt in
    ImageSets/SegmentationAug; val.txt in ImageSets/Segmentation; no labels.json, no classes.txt."""
    h, w = size
    names = [f"2007_{i:06d}" for i in range(n)]
    (root / "JPEGImages").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg"
        )
        m = np.zeros((h, w), np.uint8)
        m[4:12, 4:12] = i + 1
        m[3, 4:12] = 255
        if i < 2:
            _png(root / "SegmentationClass" / f"{name}.png", m, "P")
        else:
            _png(root / "SegmentationClassAug" / f"{name}.png", m, "L")
    m = np.zeros((h, w), np.uint8)
    m[0:5, 0:5] = 15
    _png(root / "SegmentationClassAug" / f"{names[0]}.png", m, "L")
    (root / "ImageSets" / "SegmentationAug").mkdir(parents=True)
    (root / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("\n".join(names) + "\n")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(
        "".join(f"/JPEGImages/{x}.jpg /SegmentationClass/{x}.png\n" for x in names[:2])
    )
    return names


def test_reader_on_synthetic(smoke):
    out, _ = smoke
    ds = VOCDataset(out, "train", saliency=DEFAULT_SALIENCY)
    assert len(ds) == PRESETS["smoke"]["n_train"] and ds.num_classes == 21 and ds.class_names == VOC_CLASSES
    assert ds.validate()["masks"] == len(ds)
    img, m, y, s = ds.image(0), ds.mask(0), ds.labels(0), ds.saliency(0)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3) and m.dtype == np.uint8 and m.shape == (64, 64)
    assert y.dtype == np.float32 and y.shape == (20,)
    assert s.dtype == np.float32 and s.shape == (64, 64) and 0 <= s.min() and s.max() <= 1
    assert ds.image(0) is img  # cached
    labels = json.loads((out / "labels.json").read_text())
    for i in range(len(ds)):
        assert sorted(np.flatnonzero(ds.labels(i)) + 1) == labels[ds.names[i]]
    assert ds.saliency_name == DEFAULT_SALIENCY and ds.split == "train" and ds.root == Path(out)


def test_reader_voc_layout(tmp_path):
    names = _voc_folder(tmp_path)
    ds = VOCDataset(tmp_path, "train_aug")
    assert ds.names == names and ds.num_classes == 21 and ds.class_names[1] == "aeroplane"
    # Aug preferred over SegmentationClass when both hold the name
    assert set(np.unique(ds.mask(0))) == {0, 15}
    assert set(np.unique(ds.mask(1))) == {0, 2, 255}  # palette PNG -> indices
    assert set(np.unique(ds.mask(3))) == {0, 4, 255}  # L PNG -> values
    assert list(np.flatnonzero(ds.labels(1)) + 1) == [2]  # labels derived from masks
    assert list(np.flatnonzero(ds.labels(0)) + 1) == [15]
    val = VOCDataset(tmp_path, "val")  # "img seg" pair lines
    assert val.names == names[:2]
    assert val.validate() == {"images": 2, "masks": 2, "num_classes": 21, "saliency": None}
    # a built-in source name without precomputed maps is computed from the image
    s = VOCDataset(tmp_path, "val", saliency="ft").saliency(1)
    assert s.shape == (24, 32) and s.dtype == np.float32
    # a user folder of saliency maps
    sal_dir = tmp_path / "my_sal"
    for x in names:
        _png(sal_dir / f"{x}.png", np.full((24, 32), 128, np.uint8))
    d2 = VOCDataset(tmp_path, "train_aug", saliency=str(sal_dir))
    assert abs(float(d2.saliency(2).mean()) - 128 / 255) < 1e-6 and d2.saliency_name == str(sal_dir)


def test_reader_81_classes(tmp_path):
    names = _voc_folder(tmp_path)
    m = np.zeros((24, 32), np.uint8)
    m[:4, :4] = 70
    _png(tmp_path / "SegmentationClassAug" / f"{names[2]}.png", m)
    assert VOCDataset(tmp_path, "train_aug").num_classes == 81  # from data, rounded up to COCO's 81
    coco = ["background"] + [f"c{i}" for i in range(1, 81)]
    (tmp_path / "classes.txt").write_text("\n".join(coco) + "\n")
    ds = VOCDataset(tmp_path, "train_aug")
    assert ds.num_classes == 81 and ds.class_names == coco
    assert ds.labels(2).shape == (80,) and ds.labels(2)[69] == 1
    assert VOCDataset(tmp_path, "train_aug", num_classes=81).num_classes == 81


# ------------------------------------------------------------------ bad input -> one-line DataError
def _raises(fn, *needles):
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def test_bad_inputs(tmp_path, smoke):
    _raises(lambda: VOCDataset(tmp_path / "nope"), "nope")
    (tmp_path / "empty").mkdir()
    _raises(lambda: VOCDataset(tmp_path / "empty"), "JPEGImages")

    root = tmp_path / "voc"
    names = _voc_folder(root)
    _raises(lambda: VOCDataset(root, "test"), "test.txt")
    (root / "ImageSets/Segmentation/blank.txt").write_text("\n\n")
    _raises(lambda: VOCDataset(root, "blank"), "blank.txt", "empty")
    _raises(lambda: VOCDataset(root, "train_aug", saliency="dss"), "dss", "mbd", "sr", "ft")

    ds = VOCDataset(root, "train_aug")
    _raises(lambda: ds.saliency(0), "saliency")
    (root / "JPEGImages" / f"{names[1]}.jpg").unlink()  # missing image
    _raises(lambda: ds.image(1), f"{names[1]}.jpg", "not found")
    data = (root / "JPEGImages" / f"{names[2]}.jpg").read_bytes()
    (root / "JPEGImages" / f"{names[2]}.jpg").write_bytes(data[: len(data) // 2])  # truncated jpg
    _raises(lambda: ds.image(2), f"{names[2]}.jpg", "decode")
    (root / "JPEGImages" / f"{names[3]}.jpg").write_bytes(b"this is not a jpeg")  # garbage
    _raises(lambda: ds.image(3), f"{names[3]}.jpg", "decode")
    _raises(ds.validate, names[1])

    _png(root / "SegmentationClassAug" / f"{names[0]}.png", np.zeros((10, 10), np.uint8))  # wrong size
    ds = VOCDataset(root, "train_aug")
    _raises(lambda: ds.mask(0), f"{names[0]}.png", "10x10", "32x24")

    # split without masks; a name missing from a split that has masks
    (root / "ImageSets/Segmentation/test.txt").write_text("2009_000001\n")
    Image.new("RGB", (32, 24)).save(root / "JPEGImages" / "2009_000001.jpg")
    t = VOCDataset(root, "test")
    assert not t.has_masks and t.image(0).shape == (24, 32, 3)
    _raises(lambda: t.mask(0), "2009_000001.png", "no ground-truth masks")
    _raises(lambda: t.labels(0), "2009_000001", "labels")

    # saliency: missing file, wrong size (copy of the synthetic set)
    out, _ = smoke
    syn = tmp_path / "syn"
    import shutil

    shutil.copytree(out, syn)
    n0, n1 = (syn / "ImageSets/Segmentation/train.txt").read_text().split()[:2]
    (syn / "saliency" / "sr" / f"{n0}.png").unlink()
    _png(syn / "saliency" / "sr" / f"{n1}.png", np.zeros((8, 8), np.uint8))
    s = VOCDataset(syn, "train", saliency="sr")
    _raises(lambda: s.saliency(0), f"{n0}.png", "not found")
    _raises(lambda: s.saliency(1), f"{n1}.png", "8x8", "64x64")
    _raises(s.validate, f"{n0}.png")
    # labels.json with an out-of-range class id
    lab = json.loads((syn / "labels.json").read_text())
    lab[n0] = [33]
    (syn / "labels.json").write_text(json.dumps(lab))
    _raises(lambda: VOCDataset(syn, "train").labels(0), "labels.json", "33")


# ------------------------------------------------------------------ transforms
def test_normalize_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    chw = normalize(img)
    assert chw.shape == (3, 7, 9) and chw.dtype == np.float32
    assert np.allclose(
        normalize(np.full((1, 1, 3), 255 * np.array(IMAGENET_MEAN)).astype(np.uint8)), 0, atol=0.02
    )
    assert np.array_equal(denormalize(chw), img)


def _encoded_sample(h=60, w=80):
    """An image whose colour encodes the label: 4 blocks with classes 1..4, plus a float map."""
    seg = np.zeros((h, w), np.uint8)
    seg[: h // 2, : w // 2], seg[: h // 2, w // 2 :], seg[h // 2 :, : w // 2], seg[h // 2 :, w // 2 :] = (
        1,
        2,
        3,
        4,
    )
    seg[h // 2 - 1 : h // 2 + 1] = 255
    colours = np.array([[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250], [250, 250, 0]], np.uint8)
    img = colours[np.minimum(seg, 4)]
    img[seg == 255] = (128, 128, 128)
    soft = (seg == 2).astype(np.float32)
    return {
        "image": img,
        "seg": seg,
        "sal": (seg == 1).astype(np.uint8),
        "soft": soft,
        "labels": np.ones(20, np.float32),
    }, colours


def test_paired_transform_alignment_and_determinism():
    sample, colours = _encoded_sample()
    for seed in range(6):
        out = paired_random_transform(sample, crop=48, scale=(0.7, 1.3), rng=np.random.default_rng(seed))
        again = paired_random_transform(sample, crop=48, scale=(0.7, 1.3), rng=np.random.default_rng(seed))
        assert all(np.array_equal(out[k], again[k]) for k in out)
        assert out["image"].shape == (3, 48, 48) and out["image"].dtype == np.float32
        assert out["seg"].shape == (48, 48) and out["seg"].dtype == np.int64
        assert out["soft"].dtype == np.float32 and out["labels"] is sample["labels"]
        img = denormalize(out["image"]).astype(int)
        seg = out["seg"]
        from scipy import ndimage

        same = ndimage.maximum_filter(seg, 5) == ndimage.minimum_filter(seg, 5)  # away from boundaries
        ok = (seg >= 1) & (seg <= 4) & same
        assert ok.sum() > 500
        dist = np.abs(img - colours[np.clip(seg, 0, 4)].astype(int)).sum(-1)
        assert (dist[ok] < 30).all(), seed  # image colour agrees with the label
        lab = (seg >= 1) & (seg <= 4)
        assert np.array_equal(out["sal"][lab] == 1, seg[lab] == 1)
        assert (np.abs(out["soft"][ok] - (seg[ok] == 2)) < 0.1).all()
    a = paired_random_transform(sample, 48, rng=np.random.default_rng(0))
    b = paired_random_transform(sample, 48, rng=np.random.default_rng(1))
    assert not np.array_equal(a["image"], b["image"])


def test_paired_transform_padding_and_flip():
    sample, _ = _encoded_sample(20, 30)
    out = paired_random_transform(sample, crop=64, scale=(1.0, 1.0), flip=False, rng=np.random.default_rng(0))
    seg, img = out["seg"], out["image"]
    assert seg.shape == (64, 64) and (seg == 255).sum() >= 64 * 64 - 20 * 30
    pad = seg == 255
    pad[:20, :30] = False
    assert np.all(img[:, pad] == 0) and np.all(out["soft"][pad] == 0)
    assert np.array_equal(seg[:20, :30], sample["seg"].astype(np.int64))
    flips = []
    for s in range(8):
        o = paired_random_transform(sample, crop=20, scale=(1.0, 1.0), rng=np.random.default_rng(s))
        flips.append(o["seg"][0, 0] == 2)  # top-left becomes class 2 only when flipped
    assert any(flips) and not all(flips)
    with pytest.raises(ValueError):
        paired_random_transform(
            {"image": sample["image"], "seg": np.zeros((5, 5), np.uint8)}, 16, rng=np.random.default_rng(0)
        )
