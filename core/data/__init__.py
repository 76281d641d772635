"""Data: the synthetic WSSS benchmark, the VOC-layout reader, saliency sources, paired transforms."""

from .saliency import DEFAULT_SALIENCY, SALIENCY_SOURCES, saliency_metrics
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize, paired_random_transform
from .voc import VOC_CLASSES, DataError, VOCDataset

_SYNTHETIC = ("generate", "ensure_generated", "PRESETS", "format_summary")

__all__ = [
    "DEFAULT_SALIENCY",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PRESETS",
    "SALIENCY_SOURCES",
    "VOC_CLASSES",
    "DataError",
    "VOCDataset",
    "denormalize",
    "ensure_generated",
    "format_summary",
    "generate",
    "normalize",
    "paired_random_transform",
    "saliency_metrics",
]


def __getattr__(name):
    # synthetic is imported lazily so that `python -m core.data.synthetic` runs without a runpy warning
    if name in _SYNTHETIC:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
