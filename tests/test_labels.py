"""Pseudo-label fusion, Eq. 1 saliency update, CRFs and the metrics (numpy-level units)."""

import numpy as np
import pytest

from core.crf import crf_inference, crf_saliency
from core.labels import binarize_saliency, fuse_cam_saliency, update_saliency
from core.metrics import IGNORE, confusion, fg_precision_recall, miou, pgt_summary


def test_fusion_object_background_ignore():
    cam = np.zeros((3, 4, 4), np.float32)
    cam[1, :2, :2] = 0.9  # class 2 fires top-left
    cam[0, 2:, 2:] = 0.9  # class 1 fires bottom-right, but class 1 is not in the image
    labels = np.array([0, 1, 0], np.float32)
    sal = np.zeros((4, 4), np.float32)
    sal[:2, :] = 0.5  # top half salient
    out = fuse_cam_saliency(cam, labels, sal, cam_threshold=0.2, sal_threshold=0.06)
    assert (out[:2, :2] == 2).all()  # both fire -> argmax + 1
    assert (out[:2, 2:] == IGNORE).all()  # salient only -> disagree -> ignore
    assert (out[2:, :] == 0).all()  # neither fires (class-1 CAM is masked out) -> background


def test_update_saliency_is_eq1_average_without_crf():
    rng = np.random.default_rng(0)
    a, b = rng.random((8, 8)).astype(np.float32), rng.random((8, 8)).astype(np.float32)
    img = np.zeros((8, 8, 3), np.uint8)
    np.testing.assert_allclose(update_saliency(a, b, img, use_crf=False), (a + b) / 2)
    with_crf = update_saliency(a, b, img, use_crf=True)
    assert with_crf.shape == (8, 8) and 0 <= with_crf.min() and with_crf.max() <= 1
    assert binarize_saliency(np.array([0.2, 0.7]), 0.5).tolist() == [0, 1]


def test_crf_follows_image_edges():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = 255
    p = np.full((32, 32), 0.5, np.float32)
    p[:, 16:] = 0.6
    p[:, :16] = 0.4
    q = crf_saliency(img, p)
    assert q[:, 20:].mean() > q[:, :12].mean()
    probs = np.stack([1 - p, p])
    out = crf_inference(img, probs)
    np.testing.assert_allclose(out.sum(0), 1, atol=1e-4)
    assert (out.argmax(0)[:, 18:] == 1).mean() > 0.9


def test_confusion_and_miou_by_hand():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 255], [0, 0, 1, 1]])
    conf = confusion(pred, gt, 3)
    # class 0: tp 3, fp 0, fn 1 -> 0.75; class 1: tp 2 (pred 1 at gt 1), fp 1, fn 1 (ignore) -> 0.5
    m, per = miou(conf)
    assert per[0] == pytest.approx(0.75) and per[1] == pytest.approx(0.5) and per[2] is None
    assert m == pytest.approx(0.625)
    p, r = fg_precision_recall(conf)
    assert p == pytest.approx(2 / 3) and r == pytest.approx(2 / 3)
    assert set(pgt_summary(conf)) == {"precision", "recall", "miou"}


def test_ignore_prediction_lowers_recall_not_precision():
    gt = np.array([[1, 1, 1, 1]])
    conf = confusion(np.array([[1, 255, 255, 255]]), gt, 2)
    p, r = fg_precision_recall(conf)
    assert p == 1.0 and r == 0.25


def test_crf_accepts_read_only_arrays():
    img = np.zeros((16, 16, 3), np.uint8)
    p = np.full((16, 16), 0.7, np.float32)
    img.flags.writeable = False
    p.flags.writeable = False
    assert crf_saliency(img, p).shape == (16, 16)
    probs = np.stack([1 - p, p])
    probs.flags.writeable = False
    assert crf_inference(img, probs).shape == (2, 16, 16)
