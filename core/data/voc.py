"""Reader for data sets in PASCAL VOC layout: the synthetic benchmark, VOC 2012 (+ SBD train_aug),
COCO converted to VOC layout.

Layout read (ROOT = the folder holding JPEGImages):
  JPEGImages/<name>.jpg (or .png/.jpeg)
  SegmentationClassAug/<name>.png, SegmentationClass/<name>.png   masks: palette ("P") PNGs decode to
      their palette indices, grayscale ("L"/"I") PNGs to their values; an RGB mask is mapped back through
      the VOC colour map. For each name SegmentationClassAug is tried first, then SegmentationClass:
      the SBD-augmented set is a superset of VOC's train masks (and holds identical val masks), so
      train_aug, train and val all resolve without the user having to say which folder to use.
  ImageSets/Segmentation/<split>.txt (also ImageSets/SegmentationAug/<split>.txt or ROOT/<split>.txt);
      one name per line; "JPEGImages/x.jpg SegmentationClassAug/x.png" pair lines also work.
  labels.json {name: [class ids]} optional image-level labels (else: classes present in the mask).
  classes.txt optional class names, background first (else VOC's 21 names / generic names).
  saliency/<source>/<name>.png optional saliency maps (uint8 grayscale, 0..255).

Number of classes (incl. background): the ``num_classes`` argument, else classes.txt, else
max class id in labels.json / the split's masks + 1, rounded up to 21 (VOC) or 81 (COCO).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import HarnessError

from .saliency import SALIENCY_SOURCES

__all__ = ["VOC_CLASSES", "DataError", "VOCDataset", "read_image"]

# PASCAL VOC 2012 class order, index 0 = background.
VOC_CLASSES = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
_MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")


class DataError(HarnessError, ValueError):
    """Bad input data; the message is one line naming the file or key and what was expected."""


def voc_colormap() -> np.ndarray:
    cmap = np.zeros((256, 3), np.uint8)
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every PIL/OS failure into a one-line DataError."""
    try:
        im = Image.open(path)
        im.load()
        return im
    except FileNotFoundError:
        raise DataError(f"{path}: {what} file not found") from None
    except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot decode {what} (expected a readable image file): {msg}") from None


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 HxWx3 RGB (VOCDataset.image, and core.loader's workers)."""
    im = _open(path, "image")
    try:
        return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: cannot convert image to RGB: {e}") from None


class VOCDataset:
    """A split of a VOC-layout data set. Items load lazily and are cached in memory after first read."""

    def __init__(
        self,
        root,
        split: str = "train",
        saliency: str | os.PathLike | None = None,
        num_classes: int | None = None,
        cache: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        self.cache = cache
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data set root folder not found (expected a folder in VOC layout)")
        self._img_dir = self.root / "JPEGImages"
        if not self._img_dir.is_dir():
            raise DataError(f"{self._img_dir}: folder not found (expected JPEGImages/ with the images)")
        self.split_file = self._find_split_file(split)
        self.names = self._read_split(self.split_file)
        self._mask_paths = [self._find_mask(n) for n in self.names]
        self.has_masks = any(p is not None for p in self._mask_paths)
        self._labels_json = self._read_labels_json()
        self._num_classes = int(num_classes) if num_classes is not None else None
        self._class_names = self._read_classes_txt()
        if self._num_classes is not None and self._num_classes < 2:
            raise DataError(f"num_classes={num_classes}: expected at least 2 (background + 1 class)")
        if self._num_classes is None and self._class_names is not None:
            self._num_classes = len(self._class_names)
        if (
            self._class_names is not None
            and self._num_classes is not None
            and len(self._class_names) != self._num_classes
        ):
            raise DataError(
                f"{self.root / 'classes.txt'}: lists {len(self._class_names)} classes, "
                f"expected num_classes={self._num_classes}"
            )
        self.saliency_name, self._sal_dir, self._sal_fn = self._resolve_saliency(saliency)
        self._cache: dict[tuple[str, int], np.ndarray] = {}
        self._sizes: dict[int, tuple[int, int]] = {}  # image_size() of images not decoded here

    # ---------------------------------------------------------------- construction helpers
    def _find_split_file(self, split: str) -> Path:
        candidates = [
            self.root / "ImageSets" / "Segmentation" / f"{split}.txt",
            self.root / "ImageSets" / "SegmentationAug" / f"{split}.txt",
            self.root / f"{split}.txt",
        ]
        for c in candidates:
            if c.is_file():
                return c
        raise DataError(
            f"{candidates[0]}: split file for split {split!r} not found (also looked for "
            f"{candidates[1].relative_to(self.root)} and {candidates[2].name} under {self.root})"
        )

    @staticmethod
    def _read_split(path: Path) -> list[str]:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read split file ({type(e).__name__})") from None
        names = []
        for line in lines:
            tok = line.split()
            if not tok:
                continue
            name = tok[0]
            if "/" in name or "." in os.path.basename(
                name
            ):  # "/JPEGImages/x.jpg /SegmentationClassAug/x.png"
                name = os.path.splitext(os.path.basename(name))[0]
            names.append(name)
        if not names:
            raise DataError(f"{path}: split file is empty (expected one image name per line)")
        return names

    def _find_mask(self, name: str) -> Path | None:
        for d in _MASK_DIRS:
            p = self.root / d / f"{name}.png"
            if p.is_file():
                return p
        return None

    def _read_labels_json(self) -> dict | None:
        p = self.root / "labels.json"
        if not p.is_file():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: not valid JSON (expected {{name: [class ids]}}): {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise DataError(f"{p}: expected a JSON object {{name: [class ids 1..C-1]}}")
        return data

    def _read_classes_txt(self) -> list[str] | None:
        p = self.root / "classes.txt"
        if not p.is_file():
            return None
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if len(names) < 2:
            raise DataError(f"{p}: expected one class name per line, background first (>= 2 lines)")
        return names

    def _available_sources(self) -> list[str]:
        found = set(SALIENCY_SOURCES)
        sal_root = self.root / "saliency"
        if sal_root.is_dir():
            found |= {d.name for d in sal_root.iterdir() if d.is_dir()}
        return sorted(found)

    def _resolve_saliency(self, saliency):
        """-> (name shown to users, folder of PNGs or None, function computing it on the fly or None)."""
        if saliency is None:
            return None, None, None
        s = str(saliency)
        named = self.root / "saliency" / s
        if os.sep not in s and "/" not in s and named.is_dir():
            return s, named, None
        if s in SALIENCY_SOURCES:  # built-in source without precomputed maps (e.g. real VOC): compute
            return s, None, SALIENCY_SOURCES[s]
        p = Path(s).expanduser()
        if p.is_dir():
            return str(p), p, None
        raise DataError(
            f"saliency={s!r}: unknown saliency source (expected one of "
            f"{', '.join(self._available_sources())} or an existing folder of <name>.png maps)"
        )

    # ---------------------------------------------------------------- items
    def __len__(self) -> int:
        return len(self.names)

    def _cached(self, kind: str, i: int, load):
        key = (kind, i)
        if key in self._cache:
            return self._cache[key]
        val = load()
        if self.cache:
            self._cache[key] = val
        return val

    def _index(self, i: int) -> int:
        if not -len(self.names) <= i < len(self.names):
            raise IndexError(f"index {i} out of range for {len(self.names)} items")
        return i % len(self.names)

    def image_path(self, i: int) -> Path:
        name = self.names[self._index(i)]
        for ext in _IMAGE_EXTS:
            p = self._img_dir / f"{name}{ext}"
            if p.is_file():
                return p
        raise DataError(
            f"{self._img_dir / (name + '.jpg')}: image file not found (listed in {self.split_file.name})"
        )

    def image(self, i: int) -> np.ndarray:
        """uint8 HxWx3 RGB."""
        i = self._index(i)
        return self._cached("image", i, lambda: read_image(self.image_path(i)))

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of image i, from its file's header when it is not decoded yet (core.loader draws a
        batch's crops in the training process while workers decode the images)."""
        i = self._index(i)
        if ("image", i) in self._cache:
            return self._cache[("image", i)].shape[:2]
        if i not in self._sizes:
            p = self.image_path(i)
            try:
                with Image.open(p) as im:
                    w, h = im.size
            except FileNotFoundError:
                raise DataError(f"{p}: image file not found") from None
            except Exception as e:  # noqa: BLE001 -- PIL raises many types for corrupt files
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise DataError(f"{p}: cannot decode image (expected a readable image file): {msg}") from None
            self._sizes[i] = (h, w)
        return self._sizes[i]

    def fingerprint(self) -> str:
        """Hash of the split's files as the file system sees them: every image's and mask's name, size and
        modification time, and labels.json's. Cache keys include it, so a regenerated or edited data set at
        the same path never reuses a checkpoint trained on the old one. Only stat() calls: no image is read
        or decoded (VOC train_aug would otherwise cost about 1 GB of reads per trial)."""

        def stat(p: Path | None) -> str:
            if p is None:
                return "-"
            st = p.stat()
            return f"{p.name}:{st.st_size}:{st.st_mtime_ns}"

        labels_json = self.root / "labels.json"
        h = hashlib.sha256(
            f"{self.num_classes}|{stat(labels_json if labels_json.is_file() else None)}".encode()
        )
        for i in range(len(self.names)):
            h.update(f"|{stat(self.image_path(i))}|{stat(self._mask_paths[i])}".encode())
        return h.hexdigest()[:16]

    def _size(self, i: int) -> tuple[int, int]:
        return self.image(i).shape[:2]

    def _decode_mask(self, p: Path) -> np.ndarray:
        im = _open(p, "mask")
        if im.mode == "P":
            return np.asarray(im).astype(np.uint8)  # palette indices
        if im.mode in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
            a = np.asarray(im)
            if a.size and (a.min() < 0 or a.max() > 255):
                raise DataError(f"{p}: mask values outside 0..255 (expected class indices, 255 = ignore)")
            return a.astype(np.uint8)
        if im.mode in ("RGB", "RGBA"):
            rgb = np.asarray(im.convert("RGB")).astype(np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            cmap = voc_colormap().astype(np.int64)
            lut = {int((r << 16) | (g << 8) | b): k for k, (r, g, b) in enumerate(cmap)}
            uniq, inv = np.unique(code, return_inverse=True)
            try:
                idx = np.array([lut[int(u)] for u in uniq], np.uint8)
            except KeyError:
                raise DataError(
                    f"{p}: RGB mask has colours outside the VOC colour map (expected a palette or index PNG)"
                ) from None
            return idx[inv].reshape(code.shape)
        raise DataError(f"{p}: unsupported mask mode {im.mode!r} (expected a palette 'P' or index 'L' PNG)")

    def _raw_mask(self, i: int) -> np.ndarray:
        def load():
            p = self._mask_paths[i]
            if p is None:
                tried = " or ".join(str(self.root / d / f"{self.names[i]}.png") for d in _MASK_DIRS)
                if not self.has_masks:
                    raise DataError(f"{tried}: split {self.split!r} has no ground-truth masks")
                raise DataError(f"{tried}: mask file not found")
            return self._decode_mask(p)

        return self._cached("mask", i, load)

    def mask(self, i: int) -> np.ndarray:
        """uint8 HxW: 0 background, 1..C-1 classes, 255 ignore."""
        i = self._index(i)
        m = self._raw_mask(i)
        h, w = self._size(i)
        if m.shape != (h, w):
            raise DataError(
                f"{self._mask_paths[i]}: mask is {m.shape[1]}x{m.shape[0]}, expected {w}x{h} like its image"
            )
        bad = (m != 255) & (m >= self.num_classes)
        if bad.any():
            raise DataError(
                f"{self._mask_paths[i]}: mask has class id {int(m[bad].max())}, expected "
                f"< num_classes={self.num_classes} or 255"
            )
        return m

    def labels(self, i: int) -> np.ndarray:
        """float32 (num_classes-1,) multi-hot image-level labels; index c-1 for class c."""
        i = self._index(i)
        name = self.names[i]
        if self._labels_json is not None and name in self._labels_json:
            ids = self._labels_json[name]
            src = f"{self.root / 'labels.json'} [{name!r}]"
        elif self._mask_paths[i] is not None:
            m = self._raw_mask(i)
            ids = [int(c) for c in np.unique(m) if c != 0 and c != 255]
            src = str(self._mask_paths[i])
        else:
            raise DataError(
                f"{name}: no image-level labels (not in {self.root / 'labels.json'} and no mask in "
                f"{' or '.join(_MASK_DIRS)})"
            )
        y = np.zeros(self.num_classes - 1, np.float32)
        for c in ids:
            if not isinstance(c, (int, np.integer)) or not 1 <= int(c) < self.num_classes:
                raise DataError(f"{src}: class id {c!r}, expected an integer in 1..{self.num_classes - 1}")
            y[int(c) - 1] = 1.0
        return y

    def saliency_path(self, i: int) -> Path | None:
        if self._sal_dir is None:
            return None
        return self._sal_dir / f"{self.names[self._index(i)]}.png"

    def saliency(self, i: int) -> np.ndarray:
        """float32 HxW in [0, 1]."""
        i = self._index(i)
        if self.saliency_name is None:
            raise DataError(
                f"{self.root}: data set was opened without a saliency source (pass saliency="
                f"one of {', '.join(self._available_sources())} or a folder of PNG maps)"
            )

        def load():
            h, w = self._size(i)
            if self._sal_fn is not None:
                return np.clip(self._sal_fn(self.image(i)), 0, 1).astype(np.float32)
            p = self.saliency_path(i)
            if not p.is_file():
                raise DataError(f"{p}: saliency map not found (source {self.saliency_name!r})")
            im = _open(p, "saliency map")
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                a = np.asarray(im).astype(np.float32) / 65535.0
            elif im.mode == "F":
                a = np.asarray(im).astype(np.float32)
            else:
                a = np.asarray(im.convert("L")).astype(np.float32) / 255.0
            if a.shape != (h, w):
                raise DataError(
                    f"{p}: saliency map is {a.shape[1]}x{a.shape[0]}, expected {w}x{h} like its image"
                )
            return np.clip(a, 0, 1)

        return self._cached("saliency", i, load)

    # ---------------------------------------------------------------- classes
    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            top = 0
            if self._labels_json is not None:
                top = max([int(c) for v in self._labels_json.values() for c in v] + [0])
            for i, p in enumerate(self._mask_paths):
                if p is not None:
                    m = self._raw_mask(i)
                    v = m[m != 255]
                    if v.size:
                        top = max(top, int(v.max()))
            n = top + 1
            self._num_classes = 21 if n <= 21 else max(81, n)
        return self._num_classes

    @property
    def class_names(self) -> list[str]:
        if self._class_names is not None:
            return list(self._class_names)
        if self.num_classes == 21:
            return list(VOC_CLASSES)
        return ["background"] + [f"class{c}" for c in range(1, self.num_classes)]

    # ---------------------------------------------------------------- checks
    def item_files(self, i: int) -> list[Path]:
        """The files item i is read from: its image, its mask (if any), its saliency map (a folder source)."""
        files = [self.image_path(i)]
        if self._mask_paths[self._index(i)] is not None:
            files.append(self._mask_paths[self._index(i)])
        if self._sal_dir is not None:
            files.append(self._sal_dir / f"{self.names[self._index(i)]}.png")
        return files

    def check_item(self, i: int) -> None:
        """Read item i as a trial does (image, mask where the split has masks, labels, saliency map where
        the source is a folder of maps), raising its DataError, without keeping what it read in memory."""
        i = self._index(i)
        before = set(self._cache)
        try:
            self._read_item(i, self.has_masks, self._sal_dir is not None)
        finally:
            for key in [k for k in self._cache if k[1] == i and k not in before]:
                del self._cache[key]

    def _read_item(self, i: int, masks: bool, saliency: bool) -> None:
        """What a trial reads of item i: its image, labels and, if asked, mask and saliency map."""
        self.image(i)
        if masks:
            self.mask(i)
        self.labels(i)
        if saliency:
            self.saliency(i)

    def validate(self, masks: bool | None = None) -> dict:
        """Load every item once (image, mask where the split has masks, labels, saliency if configured);
        raise the first DataError. Returns counts."""
        check_masks = self.has_masks if masks is None else masks
        for i in range(len(self)):
            self._read_item(i, check_masks, self.saliency_name is not None)
        return {
            "images": len(self),
            "masks": len(self) if check_masks else 0,
            "num_classes": self.num_classes,
            "saliency": self.saliency_name,
        }

    def __repr__(self) -> str:
        return (
            f"VOCDataset(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"saliency={self.saliency_name!r})"
        )
