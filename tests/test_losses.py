"""Tests for core.losses (Eq. 8)."""

import pytest
import torch
import torch.nn.functional as F

from core.losses import auxsegnet_loss, cls_loss, sal_loss, seg_loss


def _out(keys, b=2, c=21, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "cls": (b, c - 1),
        "seg": (b, c, h, w),
        "seg_ref": (b, c, h, w),
        "sal": (b, 1, h, w),
        "sal_ref": (b, 1, h, w),
    }
    return {k: torch.randn(shapes[k], generator=g).requires_grad_() for k in keys}


def _targets(b=2, c=21, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, c, (b, h, w), generator=g)
    seg[:, :3] = 255
    sal = torch.randint(0, 2, (b, h, w), generator=g)
    sal[:, :, :5] = 255
    return {"labels": torch.randint(0, 2, (b, c - 1), generator=g).float(), "seg": seg, "sal": sal}


@pytest.mark.parametrize(
    "keys,terms",
    [
        (("seg",), {"seg1"}),
        (("seg", "cls"), {"seg1", "cls"}),
        (("seg", "sal"), {"seg1", "sal1"}),
        (("seg", "cls", "sal"), {"seg1", "cls", "sal1"}),
        (("seg", "seg_ref", "cls", "sal"), {"seg1", "seg2", "cls", "sal1"}),
        (("seg", "seg_ref", "cls", "sal", "sal_ref"), {"seg1", "seg2", "cls", "sal1", "sal2"}),
    ],
)
def test_terms_present_per_config(keys, terms):
    out = _out(keys)
    tg = _targets()
    if "cls" not in keys:
        del tg["labels"]  # absent branches need no targets: no term is computed for them
    if "sal" not in keys:
        del tg["sal"]
    total, got = auxsegnet_loss(out, tg, {"cls": 1.0, "sal": 1.0, "seg": 1.0})
    assert set(got) == terms
    assert all(v.ndim == 0 and torch.isfinite(v) for v in got.values())
    torch.testing.assert_close(total, sum(got.values()))


def test_weights_eq8():
    out = _out(("seg", "seg_ref", "cls", "sal", "sal_ref"))
    total, t = auxsegnet_loss(out, _targets(), {"cls": 0.5, "sal": 2.0, "seg": 3.0})
    torch.testing.assert_close(
        total, 0.5 * t["cls"] + 2.0 * (t["sal1"] + t["sal2"]) + 3.0 * (t["seg1"] + t["seg2"])
    )
    total.backward()
    assert all(v.grad is not None for v in out.values())


def test_pixel_losses_match_torch_after_bilinear_upsampling():
    out, tg = _out(("seg", "sal")), _targets()
    up = F.interpolate(out["seg"], size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(
        seg_loss(out["seg"], tg["seg"]), F.cross_entropy(up, tg["seg"], ignore_index=255)
    )
    up = F.interpolate(out["sal"], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    valid = tg["sal"] != 255
    ref = F.binary_cross_entropy_with_logits(up[valid], tg["sal"][valid].float())
    torch.testing.assert_close(sal_loss(out["sal"], tg["sal"]), ref)
    lab = tg["labels"]
    torch.testing.assert_close(
        cls_loss(out := torch.randn(2, 20), lab), F.multilabel_soft_margin_loss(out, lab)
    )


def test_all_ignored_targets_give_zero_not_nan():
    out = _out(("seg", "seg_ref", "sal", "sal_ref"))
    tg = {"seg": torch.full((2, 16, 16), 255), "sal": torch.full((2, 16, 16), 255)}
    total, terms = auxsegnet_loss(out, tg, {"sal": 1.0, "seg": 1.0})
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in out.values())


def test_no_outputs_is_an_error():
    with pytest.raises(ValueError):
        auxsegnet_loss({"affinity": torch.zeros(1, 4, 4)}, {}, {})


@pytest.mark.parametrize(
    "size_in,size_out", [((12, 12), (96, 96)), ((7, 13), (50, 100)), ((41, 41), (321, 321))]
)
def test_matrix_upsampling_equals_interpolate_values_and_gradients(size_in, size_out):
    from core.losses import upsample_logits

    x = torch.randn(2, 3, *size_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, *size_out, dtype=torch.float64)
    ours = upsample_logits(x, size_out)
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-10)
