"""Tests for core.model: shapes per ablation setting, affinity maths, gradients, checkpoints and loading."""

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.config import ConfigError, make_config
from core.losses import auxsegnet_loss
from core.model import AuxSegNet, Classifier, ResNet38, load_backbone, refine_with_affinity
from core.model.affinity import NonLocal, cross_task_affinity, make_sa_fusion, propagate_features, sa_weights
from tests.conftest import VOC

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "resnet38_auxsegnet_state_dict.json"
if not REF.exists():
    REF = Path("/work/shared/reference/resnet38_auxsegnet_state_dict.json")
W = 0.0625  # tiny width for anything that runs a forward pass

# The valid settings: Table 3 (branches, no affinity) and Table 4 (affinity / constraints) rows, and more.
BRANCH_SETS = [("seg",), ("seg", "cls"), ("seg", "sal"), ("seg", "cls", "sal")]
AFF_SETTINGS = [("none", ()), ("seg", ("seg",)), ("cross_task", ("seg",)), ("cross_task", ("seg", "sal"))]
VALID = [(b, a, c) for b in BRANCH_SETS for a, c in AFF_SETTINGS if a != "cross_task" or "sal" in b]


@pytest.fixture(scope="module")
def ref():
    return json.loads(REF.read_text())


def _targets(b=2, h=64, w=64, classes=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, classes, (b, h, w), generator=g)
    seg[:, :4] = 255
    sal = torch.randint(0, 2, (b, h, w), generator=g)
    sal[:, -4:] = 255
    return {"labels": torch.randint(0, 2, (b, classes - 1), generator=g).float(), "seg": seg, "sal": sal}


def _expected_keys(branches, affinity, constraints, training):
    keys = {"seg"}
    if "cls" in branches:
        keys |= {"cls"} | (set() if training else {"cam"})
    if "sal" in branches:
        keys.add("sal")
    if affinity != "none":
        keys |= {"seg_ref", "affinity"}
    if "sal" in constraints:
        keys.add("sal_ref")
    return keys


@pytest.mark.parametrize("branches,affinity,constraints", VALID)
def test_output_shapes_every_valid_setting(branches, affinity, constraints):
    torch.manual_seed(0)
    net = AuxSegNet(21, W, branches, affinity, constraints)
    x = torch.randn(2, 3, 64, 50)  # -> 8 x 7 (ceil of /8)
    for training in (True, False):
        net.train(training)
        with torch.no_grad():
            out = net(x)
        assert set(out) == _expected_keys(branches, affinity, constraints, training)
        h, w = 8, 7
        shapes = {
            "seg": (2, 21, h, w),
            "seg_ref": (2, 21, h, w),
            "cls": (2, 20),
            "sal": (2, 1, h, w),
            "sal_ref": (2, 1, h, w),
            "affinity": (2, h * w, h * w),
            "cam": (2, 20, h, w),
        }
        for k, v in out.items():
            assert tuple(v.shape) == shapes[k], k
            assert torch.isfinite(v).all(), k
        if "affinity" in out:
            A = out["affinity"]
            assert (A >= 0).all()
            if affinity == "seg":  # A_seg is a softmax: rows sum to 1
                torch.testing.assert_close(A.sum(-1), torch.ones(2, h * w))
            else:  # A_CT mixed entry by entry (Eq. 5), not renormalised: rows sum to about 1, within (0, 2)
                rows = A.sum(-1)
                assert ((rows > 0) & (rows < 2)).all()
                torch.testing.assert_close(rows, torch.ones(2, h * w), atol=0.2, rtol=0)


@pytest.mark.parametrize(
    "branches,affinity,constraints",
    [
        (("seg", "cls"), "cross_task", ("seg",)),  # cross-task needs the sal branch
        (("cls", "sal"), "none", ()),  # seg always
        (("seg", "sal"), "none", ("seg",)),  # constraint without affinity
        (("seg", "sal"), "seg", ()),  # affinity without constraint
        (("seg", "sal"), "cross_task", ("sal",)),  # the seg constraint is required
        (("seg", "sal"), "seg", ("seg", "sal")),  # the sal constraint needs cross-task
        (("seg", "depth"), "none", ()),
        (("seg", "sal"), "global", ("seg",)),
        ("seg", "none", ()),
    ],
)
def test_invalid_settings_raise(branches, affinity, constraints):
    with pytest.raises(ValueError):
        AuxSegNet(21, W, branches, affinity, constraints)


def test_disabled_parts_have_no_parameters():
    net = AuxSegNet(21, W, ("seg",), "none", ())
    tops = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert tops == {"backbone", "seg_conv1", "seg_conv2", "seg_conv3", "seg_conv4"}
    net = AuxSegNet(21, W, ("seg", "sal"), "seg", ("seg",))
    tops = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert {"seg_att", "seg_g", "seg_W"} <= tops and not tops & {
        "fc8",
        "sal_att",
        "cross_att",
        "sal_g",
        "sal_W",
    }
    for name in ("fc8", "sal_att", "cross_att", "sal_g"):
        assert not hasattr(net, name)


def test_nonlocal_affinity_rows_sum_to_one_and_feature_residual():
    torch.manual_seed(0)
    nl = NonLocal(16)
    nl.reset_parameters()
    x = torch.randn(2, 16, 5, 6)
    A = nl(x)
    assert A.shape == (2, 30, 30)
    torch.testing.assert_close(A.sum(-1), torch.ones(2, 30))
    q, k = nl.theta(x).flatten(2), nl.phi(x).flatten(2)
    torch.testing.assert_close(A, torch.softmax(torch.einsum("bci,bcj->bij", q, k), -1))
    # the official checkpoint's g / W_z tensors are loaded but inert: frozen, no optimiser sees them
    assert not any(p.requires_grad for p in [*nl.g.parameters(), *nl.W_z.parameters()])
    g, W = torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 16, 1)
    ref = x + W(torch.einsum("bij,bcj->bci", A, g(x).flatten(2)).view_as(x))  # F_out = F_in + W(A g(F_in))
    torch.testing.assert_close(propagate_features(x, A, g, W), ref)


def _naive_sa(A2, sa):
    return torch.softmax(sa[2](torch.relu(sa[0](A2))), dim=1)  # (B, 2, HW, HW): [W1, W2]


def test_sa_weights_sum_to_one_and_match_softmax():
    torch.manual_seed(0)
    sa = make_sa_fusion()
    for p in sa.parameters():
        torch.nn.init.normal_(p)
    A2 = torch.softmax(torch.randn(2, 2, 20, 20) * 3, dim=-1)
    W = _naive_sa(A2, sa)
    torch.testing.assert_close(W.sum(1), torch.ones(2, 20, 20))
    W1 = sa_weights(A2.clone(), sa)
    torch.testing.assert_close(W1, W[:, 0])
    torch.testing.assert_close(1 - W1, W[:, 1])


def test_cross_task_affinity_eq5_and_row_sums():
    torch.manual_seed(1)
    sa = make_sa_fusion()
    for p in sa.parameters():
        torch.nn.init.normal_(p)
    A2 = torch.softmax(torch.randn(2, 2, 30, 30) * 3, dim=-1)
    W = _naive_sa(A2, sa)
    A_ct, W1 = cross_task_affinity(A2, sa)  # default: as the released network, not renormalised
    raw = W[:, 0] * A2[:, 0] + W[:, 1] * A2[:, 1]  # Eq. 5
    torch.testing.assert_close(A_ct, raw)
    torch.testing.assert_close(W1, W[:, 0])
    rows = A_ct.sum(-1)  # between the row sums of the entry-wise min and max of the two affinities
    assert (rows >= torch.minimum(A2[:, 0], A2[:, 1]).sum(-1) - 1e-6).all()
    assert (rows <= torch.maximum(A2[:, 0], A2[:, 1]).sum(-1) + 1e-6).all()
    assert (rows - 1).abs().max() > 1e-2  # the SA weights vary along a row: a row does not sum to 1
    A_norm, W1_norm = cross_task_affinity(A2, sa, row_norm=True)
    torch.testing.assert_close(A_norm, raw / raw.sum(-1, keepdim=True))
    torch.testing.assert_close(A_norm.sum(-1), torch.ones(2, 30))
    torch.testing.assert_close(W1_norm, W1)
    assert (A_ct >= 0).all() and (A_norm >= 0).all()


def _eq5_by_hand(A2, sa):
    """Eq. 4-5 one entry at a time in Python floats: SA = conv3x3 (zero padding, no bias) -> ReLU -> conv1x1
    -> softmax over its 2 channels, on the 2-channel image [A_seg, A_sal]; A_CT(i, j) = W1(i, j) A_seg(i, j)
    + W2(i, j) A_sal(i, j)."""
    w3, w1, b1 = sa[0].weight.tolist(), sa[2].weight.tolist(), sa[2].bias.tolist()
    a = A2.tolist()
    B, n = A2.shape[0], A2.shape[-1]
    out = [[[0.0] * n for _ in range(n)] for _ in range(B)]
    for b in range(B):
        for i in range(n):
            for j in range(n):
                hidden = []
                for o in range(2):
                    acc = 0.0
                    for c in range(2):
                        for di in range(3):
                            for dj in range(3):
                                ii, jj = i + di - 1, j + dj - 1
                                if 0 <= ii < n and 0 <= jj < n:
                                    acc += w3[o][c][di][dj] * a[b][c][ii][jj]
                    hidden.append(max(acc, 0.0))
                z = [b1[o] + w1[o][0][0][0] * hidden[0] + w1[o][1][0][0] * hidden[1] for o in range(2)]
                e = [math.exp(v - max(z)) for v in z]
                W1, W2 = e[0] / (e[0] + e[1]), e[1] / (e[0] + e[1])
                out[b][i][j] = W1 * a[b][0][i][j] + W2 * a[b][1][i][j]
    return torch.tensor(out, dtype=torch.float64)


def test_cross_task_affinity_is_eq5_entry_by_entry():
    torch.manual_seed(2)
    sa = make_sa_fusion().double()
    for p in sa.parameters():
        torch.nn.init.normal_(p, std=2.0)
    # [A_seg, A_sal] over 9 positions, peaked so that the SA weights vary along a row
    A2 = torch.softmax(torch.randn(2, 2, 9, 9, dtype=torch.float64) * 3, dim=-1)
    want = _eq5_by_hand(A2, sa)
    got, _ = cross_task_affinity(A2, sa)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert (want.sum(-1) - 1).abs().max() > 1e-2  # a case where the two settings differ
    got_norm, _ = cross_task_affinity(A2, sa, row_norm=True)
    rows = [[sum(r) for r in img] for img in want.tolist()]
    want_norm = torch.tensor(
        [[[v / rows[b][i] for v in r] for i, r in enumerate(img)] for b, img in enumerate(want.tolist())],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got_norm, want_norm, rtol=1e-12, atol=1e-14)


def test_affinity_row_norm_switch_in_the_network():
    torch.manual_seed(0)
    raw = AuxSegNet(21, W).eval()
    with torch.no_grad():  # peaked affinities and SA weights that vary along a row, as in a trained net
        raw.backbone.bn7.weight.mul_(300)
        for m in (raw.seg_att, raw.sal_att):
            m.theta.weight.mul_(20)
            m.phi.weight.mul_(20)
        for p in raw.cross_att.parameters():
            torch.nn.init.normal_(p)
    normed = AuxSegNet(21, W, affinity_row_norm=True).eval()
    normed.load_state_dict(raw.state_dict())
    assert not raw.affinity_row_norm and normed.affinity_row_norm
    x = torch.randn(2, 3, 64, 50, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        o_raw, o_norm = raw(x), normed(x)
    A_raw, A_norm = o_raw["affinity"], o_norm["affinity"]
    assert (A_raw.sum(-1) - 1).abs().max() > 1e-2  # released: rows sum to about 1 only
    torch.testing.assert_close(A_norm, A_raw / A_raw.sum(-1, keepdim=True))
    torch.testing.assert_close(A_norm.sum(-1), torch.ones(2, 56))  # row_norm: exactly 1
    for o, A in ((o_raw, A_raw), (o_norm, A_norm)):  # both refinements use the A_CT the net returns
        torch.testing.assert_close(o["seg_ref"], refine_with_affinity(o["seg"], A))
        torch.testing.assert_close(o["sal_ref"], refine_with_affinity(o["sal"], A))
    for k in ("cls", "cam", "seg", "sal"):  # the switch touches A_CT and the refined maps only
        assert torch.equal(o_raw[k], o_norm[k]), k
    assert not AuxSegNet(21, W).affinity_row_norm  # the released network's A_CT by default, and in paper
    assert not make_config("paper", [*VOC, "model.init_weights=none"]).model.affinity_row_norm


def test_refine_with_affinity_identity_and_formula():
    torch.manual_seed(0)
    P = torch.randn(2, 5, 4, 3)
    eye = torch.eye(12).expand(2, 12, 12)
    torch.testing.assert_close(refine_with_affinity(P, eye), P)
    A = torch.softmax(torch.randn(2, 12, 12), -1)
    ref = torch.einsum("bij,bcj->bci", A, P.flatten(2)).view_as(
        P
    )  # P_ref[:, :, i] = sum_j A[i, j] P[:, :, j]
    torch.testing.assert_close(refine_with_affinity(P, A), ref)
    with pytest.raises(ValueError):
        refine_with_affinity(P, torch.ones(2, 11, 11))


@pytest.mark.parametrize(
    "branches,affinity,constraints",
    [
        (("seg", "cls", "sal"), "cross_task", ("seg", "sal")),
        (("seg", "cls"), "seg", ("seg",)),
        (("seg",), "none", ()),
    ],
)
def test_gradients_reach_every_parameter(branches, affinity, constraints):
    torch.manual_seed(0)
    net = AuxSegNet(21, W, branches, affinity, constraints)
    out = net(torch.randn(2, 3, 64, 64))
    total, _ = auxsegnet_loss(out, _targets(), {"cls": 1.0, "sal": 1.0, "seg": 1.0})
    total.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == {
        f"{m}.{part}"
        for m in ("seg_att", "sal_att")
        if hasattr(net, m)
        for part in ("g.weight", "g.bias", "W_z.0.weight", "W_z.0.bias", "W_z.1.weight", "W_z.1.bias")
    }
    for name, p in trainable:
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_default_init_gives_every_parameter_a_grad():
    torch.manual_seed(0)
    net = AuxSegNet(21, W)
    total, _ = auxsegnet_loss(net(torch.randn(2, 3, 32, 32)), _targets(h=32, w=32), {})
    total.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_determinism_same_seed_same_outputs_and_loss():
    def run():
        torch.manual_seed(123)
        net = AuxSegNet(21, W)
        x = torch.randn(2, 3, 48, 48)
        out = net(x)  # train mode: dropout active, still seeded
        total, _ = auxsegnet_loss(out, _targets(h=48, w=48), {"cls": 1.0, "sal": 0.5, "seg": 1.0})
        return out, total

    (o1, t1), (o2, t2) = run(), run()
    assert torch.equal(t1, t2)
    for k in o1:
        assert torch.equal(o1[k], o2[k]), k


def test_width_1_backbone_state_dict_matches_reference(ref):
    with torch.device("meta"):
        bb = ResNet38(1.0)
    got = {k: list(v.shape) for k, v in bb.state_dict().items()}
    assert list(got) == list(ref["backbone"])
    assert got == ref["backbone"]


def test_width_1_official_head_names_and_parameter_counts(ref):
    with torch.device("meta"):
        net = AuxSegNet(21, 1.0, ("seg", "cls", "sal"), "cross_task", ("seg", "sal"))
        net81 = AuxSegNet(81, 1.0, ("seg", "cls", "sal"), "cross_task", ("seg", "sal"))
    heads = {k: list(v.shape) for k, v in net.state_dict().items() if not k.startswith("backbone.")}
    assert heads == ref["auxsegnet_heads_21_classes"]
    assert {
        k[len("backbone.") :]: list(v.shape) for k, v in net.state_dict().items() if k.startswith("backbone.")
    } == ref["backbone"]
    counts = ref["parameter_counts"]
    assert (
        sum(p.numel() for p in net.parameters()) == 115_382_122 == counts["auxsegnet_21_classes_parameters"]
    )
    assert (
        sum(p.numel() for p in net81.parameters()) == 115_635_562 == counts["auxsegnet_81_classes_parameters"]
    )
    floats = sum(v.numel() for k, v in net.backbone.state_dict().items() if "num_batches" not in k)
    assert floats == counts["backbone_floats_including_bn_buffers"]


def test_width_scales_channels_keeping_structure():
    with torch.device("meta"):
        small, full = ResNet38(0.25), ResNet38(1.0)
    assert list(small.state_dict()) == list(full.state_dict())
    assert small.out_channels == 1024 and small.conv1a.weight.shape == (16, 3, 3, 3)
    with torch.device("meta"):
        tiny = AuxSegNet(21, 0.0625)
    assert tiny.head_channels == 16 and tiny.seg_conv1.weight.shape == (16, 256, 3, 3)


def test_head_channels_config_key_sets_the_seg_and_sal_head_width():
    cfg = make_config("smoke", ["model.head_channels=48"])
    with torch.device("meta"):
        net = AuxSegNet(21, cfg.model.width, head_channels=cfg.model.head_channels)
    assert net.head_channels == 48
    assert (
        net.seg_conv1.weight.shape[0] == net.sal_conv3.weight.shape[0] == net.seg_conv4.weight.shape[1] == 48
    )
    assert make_config("default").model.head_channels == 64
    with pytest.raises(ConfigError, match="model.head_channels"):
        make_config("smoke", ["model.head_channels=-1"])


def _random_backbone_sd(ref, prefix="", extra=True):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in ref["backbone"].items():
        if k.endswith("num_batches_tracked"):
            sd[prefix + k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[prefix + k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[prefix + k] = torch.randn(shape, generator=g)
    if extra:  # classifier tensors of a converted checkpoint are ignored
        sd[prefix + "fc8.weight"] = torch.randn(20, 4096, 1, 1)
        sd["linear1000.weight"] = torch.randn(3, 4)
    return sd


@pytest.fixture(scope="module")
def full_backbone():
    torch.manual_seed(0)
    return ResNet38(1.0)


@pytest.mark.slow
def test_load_backbone_strict_from_state_dict_and_path(ref, full_backbone, tmp_path):
    sd = _random_backbone_sd(ref, prefix="module.")
    bb = load_backbone(sd, into=full_backbone)
    assert bb is full_backbone
    for k, v in bb.state_dict().items():
        assert torch.equal(v, sd["module." + k]), k
    # by path, with a "backbone." prefix and no num_batches_tracked (pre-0.4 converted files)
    path = tmp_path / "rn38.pth"
    torch.save({k.replace("module.", "backbone."): v for k, v in sd.items() if "num_batches" not in k}, path)
    bb = load_backbone(str(path), into=full_backbone)
    torch.testing.assert_close(bb.b7.conv_branch2b2.weight, sd["module.b7.conv_branch2b2.weight"])
    assert int(bb.bn7.num_batches_tracked) == 0


def test_load_backbone_errors(ref, full_backbone, tmp_path):
    sd = _random_backbone_sd(ref, extra=False)
    bad = dict(sd)
    bad["b4_3.conv_branch2a.weight"] = torch.zeros(512, 256, 3, 3)
    with pytest.raises(
        ValueError, match=r"b4_3\.conv_branch2a\.weight.*\(512, 512, 3, 3\).*\(512, 256, 3, 3\)"
    ) as e:
        load_backbone(bad, into=full_backbone)
    assert "\n" not in str(e.value)
    missing = dict(sd)
    del missing["b6.bn_branch2b2.running_var"]
    with pytest.raises(ValueError, match=r"missing backbone tensor 'b6\.bn_branch2b2\.running_var'") as e:
        load_backbone(missing, into=full_backbone)
    assert "\n" not in str(e.value)
    unexpected = dict(sd)
    unexpected["b5.conv_branch2b2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected backbone tensor 'b5.conv_branch2b2.weight'"):
        load_backbone(unexpected, into=full_backbone)
    with pytest.raises(FileNotFoundError, match="not found") as e:
        load_backbone(tmp_path / "nope.pth", into=full_backbone)
    assert "\n" not in str(e.value)
    with pytest.raises(
        ValueError, match=r"conv1a\.weight.*\(8, 3, 3, 3\).*\(64, 3, 3, 3\)"
    ):  # width 1.0 into 0.0625
        load_backbone(sd, into=ResNet38(0.0625))


@pytest.mark.slow
def test_classifier_and_transfer_to_auxsegnet():
    torch.manual_seed(0)
    clf = Classifier(21, W)
    x = torch.randn(2, 3, 32, 32)
    assert clf(x).shape == (2, 20)
    cam = clf.cams(x, normalize=True)
    assert cam.shape == (2, 20, 4, 4) and cam.min() >= 0 and cam.amax() <= 1
    net = AuxSegNet(21, W).eval()
    net.load_from_classifier(clf)
    clf.eval()
    torch.testing.assert_close(net(x)["cam"], clf.cams(x))
    torch.testing.assert_close(net.cams(x), clf.cams(x))
    torch.testing.assert_close(net(x)["cls"], clf(x))
    AuxSegNet(21, W, ("seg",), "none", ()).load_from_classifier(clf)  # no cls branch: backbone only
    with pytest.raises(ValueError):
        AuxSegNet(21, 0.125).load_from_classifier(clf)
    with pytest.raises(ValueError):
        AuxSegNet(21, W, ("seg",), "none", ()).cams(x)


def test_param_groups_cover_everything_once():
    net = AuxSegNet(21, W)
    groups = net.param_groups(0.001, head_lr_mult=10.0, weight_decay=1e-5)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len([p for p in net.parameters() if p.requires_grad])
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == 0.001 and by_name["head"]["lr"] == pytest.approx(0.01)
    assert by_name["head_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 1e-5
    head_ids = {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]}
    assert head_ids == {
        id(p) for n, p in net.named_parameters() if not n.startswith("backbone.") and p.requires_grad
    }
    torch.optim.SGD(groups, lr=0.001, momentum=0.9)  # accepted by the optimiser
    assert {g["name"] for g in Classifier(21, W).param_groups(0.1)} >= {"backbone", "head"}


def test_official_state_dict_round_trip_and_freeze_bn():
    torch.manual_seed(0)
    a, b = AuxSegNet(21, W), AuxSegNet(21, W)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x)["seg_ref"], b(x)["seg_ref"])
    frozen = AuxSegNet(21, W, freeze_bn=True).train()
    assert not frozen.backbone.bn7.training and frozen.seg_att.W_z[1].training
    assert not frozen.backbone.bn7.weight.requires_grad


def _released_names(sd):
    """A state dict in the released SegNet's spelling: ResNet38 tensors at the top level (no "backbone.")."""
    return {k.removeprefix("backbone."): v for k, v in sd.items()}


def _scrambled_net(seed):
    torch.manual_seed(seed)
    net = AuxSegNet(21, W)
    with torch.no_grad():  # buffers too, so a copy of them shows
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(seed + 3)
    return net


def test_load_official_renames_released_keys_and_loads_every_tensor(tmp_path):
    src, dst = _scrambled_net(0), _scrambled_net(1)
    sd = _released_names(src.state_dict())
    assert "conv1a.weight" in sd and "bn7.running_var" in sd and "seg_att.W_z.1.running_mean" in sd
    assert not torch.equal(dst.seg_conv1.weight, src.seg_conv1.weight)
    assert dst.load_official(sd) is dst
    got = dst.state_dict()
    assert set(got) == set(src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    # by path, as train_AuxAff.py saves it, or wrapped by DataParallel; this project's own format too
    path = tmp_path / "AuxSegNet_final.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    for source in (path, str(path), src.state_dict()):
        other = _scrambled_net(2).load_official(source)
        assert all(torch.equal(other.state_dict()[k], v) for k, v in src.state_dict().items())
    # checkpoints from torch < 0.4.1 have no num_batches_tracked: kept as they are, all else loads
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    net = _scrambled_net(2).load_official(old)
    torch.testing.assert_close(
        net.backbone.b7.bn_branch2b2.running_var, src.backbone.b7.bn_branch2b2.running_var
    )
    assert int(net.backbone.bn7.num_batches_tracked) == 5


def test_load_official_names_the_first_bad_tensor_in_one_line(tmp_path):
    net = AuxSegNet(21, W)
    sd = _released_names(net.state_dict())
    missing = {k: v for k, v in sd.items() if k != "b4_3.conv_branch2a.weight"}
    unexpected = {**sd, "seg_conv5.weight": torch.zeros(21, 16, 1, 1)}
    shaped = {**sd, "seg_conv4.weight": torch.zeros(20, 16, 1, 1)}
    cases = [
        (missing, r"missing tensor 'b4_3\.conv_branch2a\.weight' \(32, 32, 3, 3\)"),
        (unexpected, r"unexpected tensor 'seg_conv5\.weight'"),
        (shaped, r"tensor 'seg_conv4\.weight' has shape \(20, 16, 1, 1\).*expects \(21, 16, 1, 1\)"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            AuxSegNet(21, W).load_official(bad)
        assert "\n" not in str(e.value)
    path = tmp_path / "bad.pth"
    torch.save(shaped, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: tensor 'seg_conv4\.weight'") as e:
        AuxSegNet(21, W).load_official(path)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        AuxSegNet(21, W).load_official(tmp_path / "nope.pth")
    # a released checkpoint holds every head: a net without the sal branch names the first extra tensor
    with pytest.raises(ValueError, match=r"unexpected tensor 'sal_conv1\.weight'"):
        AuxSegNet(21, W, ("seg", "cls"), "seg", ("seg",)).load_official(sd)


def test_init_checkpoint_config_key(tmp_path):
    from core.trial import run_trial

    assert make_config("paper", [*VOC, "model.init_weights=none"]).model.init_checkpoint == ""
    cfg = make_config("smoke", [f"model.init_checkpoint={tmp_path / 'nope.pth'}"])
    assert cfg.model.init_checkpoint == str(tmp_path / "nope.pth")
    threads = torch.get_num_threads()
    try:  # a missing file fails before any data, warm-up or training
        with pytest.raises(FileNotFoundError, match="model.init_checkpoint"):
            run_trial(cfg)
    finally:
        torch.set_num_threads(threads)


def test_init_checkpoint_is_what_the_stage_network_starts_from(tmp_path, monkeypatch):
    import core.trial as trial

    cfg = make_config("smoke", ["train.workers=1", f"model.init_checkpoint={tmp_path / 'released.pth'}"])
    torch.manual_seed(5)
    src = trial.build_net(cfg, 21)
    torch.save(_released_names(src.state_dict()), tmp_path / "released.pth")

    class Data:  # the trial's data, warm-up and labels are stubbed: only the network's start is checked
        root, num_classes, saliency_name, class_names = "stub", 21, "stub", [str(i) for i in range(21)]

        def __len__(self):
            return 1

    class Started(Exception):
        pass

    def train_stage(net, *args, **kwargs):
        raise Started(net)

    clf_state = trial.build_classifier(cfg, 21).state_dict()  # a warm-up the checkpoint must replace
    monkeypatch.setattr(trial, "load_data", lambda cfg: (Data(), Data()))
    monkeypatch.setattr(trial, "warmup_and_cams", lambda cfg, ds, device, *loader: (clf_state, [], True, 0.0))
    monkeypatch.setattr(trial, "make_labels", lambda *args, **kwargs: (None, None, {}))
    monkeypatch.setattr(trial, "train_stage", train_stage)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Started) as e:
            trial.run_trial(cfg)
    finally:
        torch.set_num_threads(threads)
    net = e.value.args[0]
    for k, v in src.state_dict().items():
        assert torch.equal(net.state_dict()[k].cpu(), v), k


def test_all_setting_products_are_classified():
    # every combination is either valid (constructs) or a ValueError; the valid ones are exactly VALID
    valid = set()
    for r in range(4):
        for br in itertools.combinations(("seg", "cls", "sal"), r):
            for aff in ("none", "seg", "cross_task"):
                for c in [(), ("seg",), ("sal",), ("seg", "sal")]:
                    try:
                        with torch.device("meta"):
                            AuxSegNet(21, W, br, aff, c)
                        valid.add((br, aff, c))
                    except ValueError:
                        pass
    assert valid == set(VALID)


@pytest.mark.parametrize("row_norm", [False, True])
def test_fused_cross_task_matches_plain_maths_values_and_grads(row_norm):
    from core.model.affinity import cross_task, propagate

    def plain(f_seg, f_sal, seg_att, sal_att, sa, seg_g, seg_W, sal_g, sal_W, row_norm):
        A_seg = torch.softmax(torch.bmm(*seg_att.query_key(f_seg)), -1)
        A_sal = torch.softmax(torch.bmm(*sal_att.query_key(f_sal)), -1)
        Wt = torch.softmax(sa[2](F.relu(sa[0](torch.cat([A_seg[:, None], A_sal[:, None]], 1)))), dim=1)
        A_ct = Wt[:, 0] * A_seg + Wt[:, 1] * A_sal  # official channel order [A_seg, A_sal]
        if row_norm:
            A_ct = A_ct / A_ct.sum(-1, keepdim=True)
        seg = f_seg + seg_W(propagate(A_seg, seg_g(f_seg)))
        sal = f_sal + sal_W(propagate(A_sal, sal_g(f_sal)))
        return seg, sal, A_ct

    torch.manual_seed(0)
    mods = [NonLocal(16), NonLocal(16), make_sa_fusion()] + [torch.nn.Conv2d(16, 16, 1) for _ in range(4)]
    for p in mods[2].parameters():
        torch.nn.init.normal_(p)
    params = [p for m in mods for p in m.parameters() if p.requires_grad]
    f_seg, f_sal = torch.randn(2, 16, 5, 4), torch.randn(2, 16, 5, 4)
    results = []
    for fn in (cross_task, plain):
        for p in params:
            p.grad = None
        outs = fn(f_seg, f_sal, *mods, row_norm=row_norm)
        sum(
            (o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i))).sum()
            for i, o in enumerate(outs)
        ).backward()
        results.append((outs, [p.grad.clone() for p in params]))
    (o1, g1), (o2, g2) = results
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ paper preset: as the released code trains
def _paper_cfg(*extra):
    return make_config("paper", [*VOC, f"model.width={W}", *extra])


def test_frozen_bn_and_conv1a_survive_a_training_step():
    from core.build import build_classifier, build_net
    from core.train import stage_optimizer

    cfg = _paper_cfg()
    assert cfg.model.freeze_bn
    torch.manual_seed(0)
    net = build_net(cfg, 21).train()
    bb = net.backbone
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    opt = stage_optimizer(net, cfg)
    loss, _ = auxsegnet_loss(
        net(torch.randn(2, 3, 32, 32)), _targets(2, 32, 32), {"cls": 1, "sal": 1, "seg": 1}
    )
    opt.zero_grad()
    loss.backward()
    opt.step()
    after = bb.state_dict()
    bns = [n for n, m in bb.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) > 30 and all(not bb.get_submodule(n).training for n in bns)
    for n in bns:
        for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[f"{n}.{t}"], after[f"{n}.{t}"]), f"{n}.{t} changed"
    assert torch.equal(before["conv1a.weight"], after["conv1a.weight"]) and bb.conv1a.weight.grad is None
    assert not torch.equal(before["b2.conv_branch2a.weight"], after["b2.conv_branch2a.weight"]), (
        "no step taken"
    )
    clf = build_classifier(cfg, 21).train()  # the warm-up net freezes the same tensors
    assert not clf.backbone.bn7.training and not clf.backbone.conv1a.weight.requires_grad


def test_paper_preset_optimiser_groups_follow_the_released_code():
    from core.build import build_net
    from core.train import stage_optimizer

    cfg = _paper_cfg()
    net = build_net(cfg, 21)
    opt = stage_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.SGD) and cfg.train.lr == pytest.approx(7e-4)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            assert id(p) not in group_of
            continue
        g = group_of[id(p)]
        # released rule: 10x for names containing seg, sal or fc8; everything else (cross_att) at 1x
        tenx = not name.startswith("backbone.") and any(s in name for s in ("seg", "sal", "fc8"))
        assert name.startswith(("backbone.", "cross_att.")) or tenx, name
        assert g["lr"] == pytest.approx(cfg.train.lr * (10 if tenx else 1)), name
        assert g["momentum"] == 0.0 and g["weight_decay"] == 0.0
    assert any(g["name"] == "fusion" for g in opt.param_groups)
    frozen = {n for n, p in net.backbone.named_parameters() if not p.requires_grad}
    assert "conv1a.weight" in frozen
    assert all(n == "conv1a.weight" or ".bn" in n or n.startswith("bn") for n in frozen)
    # the paper-text alternative is one --set away
    alt = _paper_cfg("train.momentum=0.9", "train.weight_decay=1e-5", "train.fusion_lr_mult=0")
    opt = stage_optimizer(build_net(alt, 21), alt)
    # BN frozen and convs without bias: no decay-free backbone group
    assert {g["name"] for g in opt.param_groups} == {"backbone", "head", "head_no_decay"}
    by = {g["name"]: g for g in opt.param_groups}
    assert by["head"]["lr"] == pytest.approx(7e-3) and by["head"]["momentum"] == 0.9
    assert by["backbone"]["weight_decay"] == 1e-5
    # the default preset keeps cross_att with the heads and BN training; refined CAMs as the released code
    d = make_config("default")
    assert (d.model.freeze_bn, d.train.fusion_lr_mult, d.labels.refined_cam_renorm) == (False, 0.0, False)


@pytest.mark.parametrize("row_norm", [False, True])
def test_full_model_trains_under_cpu_bf16_autocast(row_norm):
    # train.cpu_amp: the SA conv gives bf16 while the affinities' softmax stays fp32; Eq. 5 must mix them
    torch.manual_seed(0)
    net = AuxSegNet(width=W, head_channels=16, dilations=(1, 2, 3), affinity_row_norm=row_norm)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    loss, _ = auxsegnet_loss({k: v.float() for k, v in out.items()}, _targets())
    loss.backward()
    assert torch.isfinite(loss) and net.cross_att[0].weight.grad is not None
    rows = out["affinity"].float().sum(-1)
    if row_norm:
        torch.testing.assert_close(rows, torch.ones(2, 64), atol=1e-2, rtol=0)
    net.eval()  # no dropout: the bf16 A_CT against the fp32 one of the same weights and input
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        A16 = net(x)["affinity"].float()
    with torch.no_grad():
        A32 = net(x)["affinity"]
    torch.testing.assert_close(A16.sum(-1), A32.sum(-1), atol=1e-2, rtol=0)
    torch.testing.assert_close(A16, A32, atol=1e-3, rtol=5e-2)


def test_nonlocal_zero_init_starts_the_feature_update_as_the_identity():
    torch.manual_seed(0)
    cfg = make_config("smoke", ["model.nonlocal_zero_init=true"])
    from core.build import build_net

    net = build_net(cfg, 21)
    for name in ("seg_W", "sal_W"):
        assert not getattr(net, name).weight.any() and not getattr(net, name).bias.any()
    x = torch.randn(2, net.head_channels, 4, 4)
    A = torch.softmax(torch.randn(2, 16, 16), -1)
    torch.testing.assert_close(propagate_features(x, A, net.seg_g, net.seg_W), x)
    authors = make_config("smoke", ["model.nonlocal_zero_init=false"])
    assert build_net(authors, 21).seg_W.weight.abs().sum() > 0  # the authors' default init


def test_nonlocal_tied_init_starts_each_affinity_as_a_symmetric_feature_similarity():
    from core.build import build_net

    torch.manual_seed(0)
    net = build_net(make_config("smoke", ["model.nonlocal_tied_init=true"]), 21)
    f = torch.randn(2, net.head_channels, 4, 4)
    for att in (net.seg_att, net.sal_att):
        q, k = att.query_key(f)
        logits = torch.bmm(q, k)
        torch.testing.assert_close(logits, logits.mT)  # z_i . z_j with z = theta(F)
        assert torch.linalg.eigvalsh(logits.double()).min() > -1e-4  # a Gram matrix: positive semi-definite
    torch.manual_seed(0)
    plain = build_net(make_config("smoke", ["model.nonlocal_tied_init=false"]), 21)
    q, k = plain.seg_att.query_key(f)
    assert (torch.bmm(q, k) - torch.bmm(q, k).mT).abs().max() > 1e-2  # the authors' independent draws
    torch.testing.assert_close(plain.seg_att.theta.weight, net.seg_att.theta.weight)  # theta's draw is kept


def test_batched_evaluation_predicts_what_one_image_at_a_time_does():
    import numpy as np

    from core.evaluate import predict_batched, predict_probs

    class Images:  # two sizes, interleaved: same-size neighbours share a pass, a new size starts one
        sizes = [(40, 48), (40, 48), (40, 48), (32, 32), (40, 48), (40, 48)]

        def image(self, i):
            return np.random.default_rng(i).integers(0, 255, (*self.sizes[i], 3), dtype=np.uint8)

    torch.manual_seed(0)
    net = AuxSegNet(width=W, head_channels=16, dilations=(1, 2, 3)).eval()
    ds = Images()
    got = list(predict_batched(net, ds, [5, 0, 1, 2, 3, 4], torch.device("cpu"), batch=2))
    assert [i for i, _ in got] == [5, 0, 1, 2, 3, 4]
    for i, pred in got:
        want = predict_probs(net, ds.image(i), torch.device("cpu")).argmax(0)
        assert pred.shape == ds.sizes[i] and (pred == want).mean() > 0.999


def test_a_head_starts_the_same_in_every_ablation_row_of_a_seed():
    def build(branches, affinity, constraints, seed=3):
        torch.manual_seed(seed)
        net = AuxSegNet(
            width=W, branches=branches, affinity=affinity, constraints=constraints, head_streams=True
        )
        return net, torch.rand(1)  # what the global stream gives next

    seg, after_seg = build(("seg",), "none", ())
    full, after_full = build(("seg", "cls", "sal"), "cross_task", ("seg", "sal"))
    for k, v in seg.state_dict().items():
        if k.startswith("seg_"):
            torch.testing.assert_close(full.state_dict()[k], v, rtol=0, atol=0)
    other, _ = build(("seg",), "none", (), seed=4)
    assert not torch.equal(other.seg_conv1.weight, seg.seg_conv1.weight)  # the seed still moves the heads
    assert not torch.equal(full.sal_conv1.weight, full.seg_conv1.weight[:, : full.sal_conv1.weight.shape[1]])
    # heads leave the global stream alone: the backbone is drawn first, so what follows depends on it only
    assert torch.equal(after_seg, after_full)


def test_eval_refined_switch_picks_the_refined_or_the_plain_seg_logits():
    import numpy as np

    from core.evaluate import predict_probs

    torch.manual_seed(0)
    net = AuxSegNet(width=W, head_channels=16, dilations=(1, 2, 3)).eval()
    img = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    refined = predict_probs(net, img, torch.device("cpu"))
    plain = predict_probs(net, img, torch.device("cpu"), refined=False)
    assert not np.allclose(refined, plain)
    from core.data import normalize

    with torch.no_grad():
        out = net(torch.from_numpy(normalize(img))[None])
    for key, probs in (("seg_ref", refined), ("seg", plain)):
        want = F.interpolate(out[key], size=(40, 48), mode="bilinear", align_corners=False).softmax(1)[0]
        np.testing.assert_allclose(probs, want.numpy(), atol=1e-5)
    assert make_config("smoke", ["eval.refined=false"]).eval.refined is False


def test_bench_parity_needs_the_authors_repository(tmp_path, capsys):
    from bench.bench_parity import main

    assert main([]) == 2  # nothing is compared, nothing faked
    assert "needs the authors' repository" in capsys.readouterr().err
    assert main(["--official", str(tmp_path)]) == 2
    assert "no network/AuxSegNet.py" in capsys.readouterr().err
