"""The backbone weights a trial starts from (`model.init_weights`): what the key names, whether the file fits
a backbone of the configured width (checked before any training, one line naming the file and the fix), and
its cache-key fingerprint. core.pretrain writes the embedded benchmark's checkpoints that "synthetic" names.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

import torch

from core.config import ConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT = "auxsegnet-harness/synthetic-pretrained-resnet38/v1"


class PretrainedError(ConfigError):
    """A missing, corrupt or mismatched pretrained checkpoint; one line naming the file and the fix."""


def pretrained_path(width: float) -> Path:
    """Where the committed checkpoint for a width lives (core/weights/resnet38_synthetic_w<width>.pt)."""
    return WEIGHTS_DIR / f"resnet38_synthetic_w{width:g}.pt"


def shown_path(path: Path | str) -> str:
    """A path relative to the working directory when it lies below it (commands to copy and paste)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def rebuild_command(width: float, out: Path | str | None = None, size: int | None = None) -> str:
    size = size or (64 if width < 0.1 else 96)
    return (
        f"python -m core.pretrain --width {width:g} --size {size} "
        f"--out {shlex.quote(shown_path(out or pretrained_path(width)))}"
    )


def resolve_init_weights(init_weights: str, width: float) -> Path | None:
    """`model.init_weights`: "" or "none" -> None (random init; "none" says so explicitly, which a VOC run
    at width 1.0 requires), "synthetic" -> the pretrained checkpoint for this width, anything else -> that
    path."""
    if not init_weights or init_weights == "none":
        return None
    if init_weights == "synthetic":
        return pretrained_path(width)
    return Path(init_weights).expanduser()


def _meta(ckpt) -> dict | None:
    """A checkpoint's "meta" dict when this module wrote it, else None (e.g. ImageNet weights)."""
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def read_meta(path: Path) -> dict | None:
    """The checkpoint's "meta" dict when it was written by this module, else None (e.g. ImageNet weights)."""
    try:
        return _meta(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # noqa: BLE001 - check_init_weights names the problem
        return None


def check_init_weights(init_weights: str, width: float) -> Path | None:
    """Resolve `model.init_weights` and check it fits a backbone of this width, before any training.

    Raises PretrainedError (one line: file, what is wrong, and for our pretrained checkpoints the command
    that rebuilds it). Returns the resolved path (None for random init). Reads the file once.
    """
    from core.model import ResNet38, backbone_state_dict_from

    path = resolve_init_weights(init_weights, width)
    if path is None:
        return None
    ours = init_weights == "synthetic" or path.parent == WEIGHTS_DIR
    if not path.is_file():
        hint = f"; rebuild it with: {rebuild_command(width, path)}" if ours else ""
        what = "no pretrained checkpoint" if init_weights == "synthetic" else "no such checkpoint file"
        raise PretrainedError(f"model.init_weights={init_weights}: {what} {path}{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - one line for the user
        ckpt, error = None, f"cannot read it ({type(e).__name__})"
    meta = _meta(ckpt)
    hint = (
        f"; rebuild it with: {rebuild_command(width, path, meta and meta.get('size'))}"
        if ours or meta
        else ""
    )
    if ckpt is None:
        raise PretrainedError(f"model.init_weights: {path}: {error}{hint}")
    if not isinstance(ckpt, dict):
        raise PretrainedError(
            f"model.init_weights: {path} holds a {type(ckpt).__name__}, not a state dict{hint}"
        )
    if meta is not None and float(meta.get("width", -1)) != float(
        width
    ):  # a checkpoint for this width instead
        raise PretrainedError(
            f"model.init_weights: {path} was pretrained at width {meta.get('width')}, "
            f"but model.width is {width:g}; build one with: {rebuild_command(width)}"
        )
    try:
        backbone_state_dict_from(ckpt, ResNet38(width, block_dropout=False).state_dict())
    except ValueError as e:
        raise PretrainedError(f"model.init_weights: {path}: {e}{hint}") from None
    return path


def weights_fingerprint(path: Path | None) -> str:
    """Cache-key part for the initial weights: name, size and mtime (like the data fingerprint)."""
    if path is None:
        return "none"
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
