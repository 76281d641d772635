"""Config rules and the paper preset's settings as the authors' released code trains (issue 12)."""

import numpy as np
import pytest
import torch

from core.config import ConfigError, make_config
from core.init_weights import check_init_weights, resolve_init_weights
from tests.conftest import VOC, run_module


def test_paper_preset_trains_as_the_released_code():
    c = make_config("paper", [*VOC, "model.init_weights=/w/resnet38.pth"])
    assert c.model.freeze_bn and c.train.optimizer == "sgd"
    assert (c.train.momentum, c.train.weight_decay, c.train.fusion_lr_mult) == (0.0, 0.0, 1.0)
    assert not c.train.amp and not c.labels.refined_cam_renorm
    # one CAM network for every seed, as the released pipeline (and the default preset, measured: README)
    assert c.train.warmup_seed == make_config("default").train.warmup_seed == "0"
    assert make_config("smoke").train.warmup_seed == ""  # the tests' preset keeps a warm-up per seed
    for preset in ("smoke", "default"):  # the CPU presets keep trained BN and the 10x fusion lr (measured)
        d = make_config(preset)
        assert not d.model.freeze_bn and d.train.fusion_lr_mult == 0.0
    # refined CAMs: the default preset follows the released code (measured better: README), smoke keeps renorm
    assert (
        not make_config("default").labels.refined_cam_renorm
        and make_config("smoke").labels.refined_cam_renorm
    )
    with pytest.raises(ConfigError, match="train.fusion_lr_mult"):
        make_config("smoke", ["train.fusion_lr_mult=-1"])


def test_voc_at_full_width_needs_init_weights_or_an_explicit_none(tmp_path):
    with pytest.raises(ConfigError, match="model.init_weights") as e:
        make_config("paper", VOC)
    assert "\n" not in str(e.value) and "model.init_weights=none" in str(e.value)
    assert make_config("paper", [*VOC, "model.init_weights=none"]).model.init_weights == "none"
    make_config("paper", [*VOC, "model.width=0.125"])  # a narrow VOC net may start from scratch
    make_config("smoke", ["model.width=1.0"])  # only VOC asks for ImageNet weights
    assert resolve_init_weights("none", 1.0) is None and check_init_weights("none", 1.0) is None
    p = run_module("core.trial", ["--preset", "paper", "--set", *VOC, "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "model.init_weights" in p.stderr and p.stderr.strip().count("\n") == 0


def test_init_weights_none_warns_once_when_the_trial_starts(monkeypatch, capsys):
    from core import trial

    class Data:
        root, num_classes, saliency_name, class_names = "/d", 21, "sr", ["bg"] * 21

        def __len__(self):
            return 1

    class Stop(Exception):
        pass

    def stop(workers):
        raise Stop

    monkeypatch.setattr(trial, "load_data", lambda cfg: (Data(), Data()))
    monkeypatch.setattr(trial, "make_pool", stop)
    with pytest.raises(Stop):
        trial.run_trial(make_config("smoke", ["model.init_weights=none"]))
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: model.init_weights=none") and err.count("\n") == 0


class _Images:
    def __init__(self, n=2, size=32):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return self.images[i]


@pytest.mark.slow
def test_refined_cam_renorm_reaches_network_cues():
    from core.build import build_net
    from core.cues import network_cues

    ds, cpu = _Images(), torch.device("cpu")
    maps = {}
    for renorm in (True, False):
        cfg = make_config("smoke", [f"labels.refined_cam_renorm={str(renorm).lower()}"])
        torch.manual_seed(0)
        net = build_net(cfg, 21)
        cam_at, _ = network_cues(net, ds, None, cfg, cpu)
        maps[renorm] = [cam_at(i) for i in range(len(ds))]
    for on, off in zip(maps[True], maps[False]):
        live = on.reshape(len(on), -1).max(1) > 0
        assert live.any()
        # the same maps up to a per-class scale: the second max-normalisation is the only difference
        scale = off.reshape(len(off), -1).max(1)[live] / on.reshape(len(on), -1).max(1)[live]
        np.testing.assert_allclose(off[live], on[live] * scale[:, None, None], rtol=1e-4, atol=1e-6)
        assert scale.max() <= 1 + 1e-5 and scale.min() < 0.999  # A_CT averaging lowered the peaks
    # without an affinity there is no refined CAM: it is normalised once either way
    cfg = make_config(
        "smoke", ["model.affinity=none", "model.constraints=", "labels.refined_cam_renorm=false"]
    )
    torch.manual_seed(0)
    cam_at, _ = network_cues(build_net(cfg, 21), ds, None, cfg, cpu)
    cam = cam_at(0)
    assert cam.max() > 0.9 and cam.max() <= 1.0 + 1e-5


def test_warmup_cache_key_is_unchanged_unless_the_new_keys_matter():
    from core.warmup import WARMUP_KEYS, warmup_keys

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    smoke = make_config("smoke")
    assert warmup_keys(smoke, cpu) == WARMUP_KEYS  # train.amp does nothing on the CPU
    assert "model.freeze_bn" in warmup_keys(make_config("smoke", ["model.freeze_bn=true"]), cpu)
    assert "train.amp" in warmup_keys(smoke, gpu)  # bf16 and fp32 warm-ups differ on a GPU
    scratch = make_config("smoke", ["model.init_weights=none"])  # random init either way, but its own entry
    assert scratch.fingerprint(warmup_keys(scratch, cpu)) != smoke.fingerprint(warmup_keys(smoke, cpu))


def _changed(v):
    """Another value of v's type (validity does not matter to a fingerprint)."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, (int, float)):
        return v + 1
    if isinstance(v, tuple):
        return (*v, v[0] if v else "x")
    return "7" if v == "" else v + "x"


def test_the_warmup_cache_key_is_every_field_marked_as_a_warmup_input_and_nothing_else():
    """core.warmup's key comes from the fields core.config marks (warmup_input): changing any of them is a
    cache miss, changing any other field (stage, loss, affinity, evaluation) a hit."""
    import dataclasses

    from core.config import warmup_inputs
    from core.warmup import config_key

    cpu = torch.device("cpu")
    base = make_config("smoke")
    marked = set(warmup_inputs())
    assert {"seed", "train.warmup_epochs", "model.init_weights", "train.warmup_seed"} <= marked
    assert not marked & {"loss.sal", "model.affinity", "train.stage_epochs", "labels.cam_threshold"}
    seen = 0
    for top in dataclasses.fields(base):
        section = getattr(base, top.name)
        subfields = dataclasses.fields(section) if dataclasses.is_dataclass(section) else [None]
        for f in subfields:
            key = top.name if f is None else f"{top.name}.{f.name}"
            if f is None:
                cfg = dataclasses.replace(base, **{top.name: _changed(section)})
            else:
                value = _changed(getattr(section, f.name))
                cfg = dataclasses.replace(base, **{top.name: dataclasses.replace(section, **{f.name: value})})
            assert (config_key(cfg, cpu) != config_key(base, cpu)) == (key in marked), key
            seen += 1
    assert seen > 60


def test_kernel_caps_are_recorded_and_key_the_warmup_cache(monkeypatch):
    """A warm-up trained with oneDNN / MKL capped at AVX2, or on another CPU model at the same kernel level,
    computes other floats: it gets its own cache key."""
    from core.environment import KERNEL_CAP_VARS, environment, numerics_fingerprint

    cpu, cfg = torch.device("cpu"), make_config("smoke")
    for var in KERNEL_CAP_VARS:
        monkeypatch.delenv(var, raising=False)
    plain = numerics_fingerprint(cpu, cfg)
    assert environment(cpu, cfg)["kernel_caps"] == ""
    with monkeypatch.context() as m:
        m.setattr("core.environment.cpu_model", lambda: "AMD EPYC 9R14 96-Core Processor")
        assert numerics_fingerprint(cpu, cfg) != plain
    assert numerics_fingerprint(cpu, cfg) == plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert environment(cpu, cfg)["kernel_caps"] == "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"
    assert numerics_fingerprint(cpu, cfg) != plain


def test_cpu_amp_is_off_on_or_auto_and_auto_follows_the_cpu(monkeypatch):
    import core.train as train
    from core.environment import environment, numerics_fingerprint

    for given, want in (("true", "on"), ("false", "off"), ("on", "on"), ("off", "off"), ("auto", "auto")):
        assert make_config("smoke", [f"train.cpu_amp={given}"]).train.cpu_amp == want
    assert make_config("smoke", {"train.cpu_amp": True}).train.cpu_amp == "on"  # study.yaml's YAML boolean
    with pytest.raises(ConfigError, match=r"train.cpu_amp: 'fast' is not one of \['off', 'on', 'auto'\]"):
        make_config("smoke", ["train.cpu_amp=fast"])
    cpu = torch.device("cpu")
    auto, off = make_config("smoke", ["train.cpu_amp=auto"]), make_config("smoke")
    for native in (True, False):
        monkeypatch.setattr(train, "cpu_bf16_supported", lambda native=native: native)
        assert train.bf16_active(auto, cpu) is native
        assert environment(cpu, auto)["precision"] == ("bf16" if native else "fp32")
        # a cached warm-up trained in bf16 never stands in for an fp32 one (same config, other CPU)
        assert (numerics_fingerprint(cpu, auto) == numerics_fingerprint(cpu, off)) is not native
    monkeypatch.setattr(train, "cpu_bf16_supported", lambda: False)
    with pytest.raises(RuntimeError, match="train.cpu_amp=on: this CPU .* has no native bf16"):
        train.check_amp(make_config("smoke", ["train.cpu_amp=on"]), cpu)
    train.check_amp(auto, cpu)  # auto falls back to fp32 without a word
