"""One typed, frozen trial config: defaults from the paper / authors' code, presets, dotted overrides.

    cfg = make_config("smoke", ["model.affinity=seg", "loss.sal=0.5"])
    cfg.model.affinity            -> "seg"
    cfg.to_dict()                 -> nested plain dict (saved with every result)
    config_from_dict(d)           -> Config again (round trip)

Every error is a one-line `ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from core.ablation import SettingError, check_config
from core.errors import HarnessError


class ConfigError(HarnessError, ValueError):
    """A bad config key or value; the message is one line naming the key."""


def warmup_input(default: Any) -> Any:
    """A field the classification warm-up and the initial CAMs read: core.warmup keys its cache by every
    field so marked, so a new one cannot silently reuse a stale warm-up."""
    return field(default=default, metadata={"warmup": True})


@dataclass(frozen=True)
class DataConfig:
    name: str = warmup_input("synthetic")  # synthetic | voc
    root: str = warmup_input("")  # synthetic: "" -> runs/data/<preset>-seed<seed> (generated on first use)
    preset: str = warmup_input("default")  # synthetic generator preset (smoke | default)
    seed: int = warmup_input(
        0
    )  # synthetic generator seed; the dataset stays fixed while `seed` varies training
    saliency: str = ""  # built-in source name or a folder of PNGs; "" -> the generator's best source
    train_split: str = warmup_input("train")
    val_split: str = "val"
    num_classes: int = warmup_input(0)  # 0 -> taken from the data (21 VOC / synthetic, 81 COCO)


@dataclass(frozen=True)
class ModelConfig:
    width: float = warmup_input(1.0)
    branches: tuple[str, ...] = ("seg", "cls", "sal")
    affinity: str = "cross_task"
    constraints: tuple[str, ...] = ("seg", "sal")
    # "" (unset) or "none" (explicit) -> random init; "synthetic" -> core/weights' backbone pretrained at
    # this width (core.pretrain); else a path: a converted ImageNet ResNet38 checkpoint (width 1.0) or a
    # core.pretrain checkpoint.
    init_weights: str = warmup_input("")
    # A whole-network checkpoint loaded into the stage network after it is built (AuxSegNet.load_official):
    # the authors' SegNet state dict as their train_AuxAff.py saves it, or this project's AuxSegNet
    # state_dict(); "" -> none. It replaces the warm-up's backbone and fc8 and the fresh heads; the warm-up
    # (train.warmup_epochs=0 skips its training) still gives the initial CAMs for stage 0's pseudo labels.
    init_checkpoint: str = ""
    dropout: float = warmup_input(0.5)  # Dropout2d before GAP in the cls branch
    block_dropout: bool = warmup_input(
        True
    )  # ResNet38's Dropout2d in b6/b7 (drowns the signal in narrow CPU-width nets)
    dilations: tuple[int, ...] = (
        6,
        12,
        18,
    )  # head atrous rates (paper); scale them down with the feature map
    head_channels: int = 0  # seg / sal head width D; 0 -> 128 * width (authors' 128 at full width)
    # Zero-initialise the non-local output convs (seg_W, sal_W), so Eq. 2-3's F_out = F_in + W(A g(F_in))
    # starts as the identity (Wang et al.'s non-local init); the authors' code keeps PyTorch's default.
    nonlocal_zero_init: bool = False
    # phi starts as a copy of theta in each non-local affinity (Eq. 2-3), so A = softmax_row(z_i . z_j),
    # z = theta(F), starts as a similarity of the task's features (a symmetric positive semi-definite kernel)
    # instead of a random bilinear form; the authors' code draws theta and phi independently.
    nonlocal_tied_init: bool = False
    # Divide each row of the cross-task affinity A_CT (Eq. 5) by its sum. The released network uses A_CT as
    # mixed (rows sum to about 0.96-1.13), in both refinements and in the label update; so do all presets:
    # dividing measured no different (default preset, stage 0, seeds 0-2: full model 35.5 / 34.8 / 35.8
    # as released vs 35.5 / 34.7 / 35.8 divided; smoke, seeds 0-9: released - divided -0.0 [-2.3, +2.2]).
    affinity_row_norm: bool = False
    # Common random numbers across ablation rows: each head's initial weights from its own stream (trial
    # seed, head name), so a head starts identical in every row of a seed. On in the default and smoke
    # presets.
    head_streams: bool = False
    # Backbone BatchNorm in eval mode with frozen affine parameters, and conv1a frozen, as the authors' code
    # (BN statistics stay the pretrained ones). Off here: a backbone trained from scratch needs BN to learn.
    freeze_bn: bool = warmup_input(False)


@dataclass(frozen=True)
class LossConfig:
    cls: float = 1.0  # lambda_1 (Eq. 8)
    sal: float = 1.0  # lambda_2
    seg: float = 1.0  # lambda_3


@dataclass(frozen=True)
class TrainConfig:
    warmup_epochs: int = warmup_input(15)
    warmup_lr: float = warmup_input(0.01)
    # The seed of the classification warm-up, which gives the initial CAMs (the CAM network behind the first
    # pseudo labels) and the stage network's backbone start: "" -> the trial's seed, a CAM network per seed;
    # an integer -> one warm-up shared by every seed, as the released pipeline's one CAM network.
    warmup_seed: str = warmup_input("")
    optimizer: str = warmup_input(
        "sgd"
    )  # sgd (paper) | adam: trains the from-scratch CPU-width nets in far fewer steps
    stage_epochs: int = 10
    stages: int = 5  # stages 0..stages-1 (paper Table 5 reports 0..4)
    batch_size: int = warmup_input(4)
    lr: float = 0.0007
    head_lr_mult: float = 10.0  # stage training: heads at 10x the backbone lr (authors)
    # cross_att (the SA fusion of Eq. 4-5) at this x lr; 0 -> head_lr_mult. The authors' 10x goes to parameter
    # names containing seg, sal or fc8, so their cross_att trains at 1x.
    fusion_lr_mult: float = 0.0
    warmup_head_lr_mult: float = warmup_input(10.0)  # warm-up: fc8 at this x warmup_lr
    momentum: float = warmup_input(0.9)
    weight_decay: float = warmup_input(1e-5)
    poly_power: float = warmup_input(0.9)
    crop: int = warmup_input(321)
    scale_min: float = warmup_input(0.7)
    scale_max: float = warmup_input(1.3)
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = warmup_input(True)  # bf16 autocast on a GPU (ignored on the CPU); the authors train in fp32
    # bf16 autocast on the CPU: off | on (needs AVX512-BF16 or AMX; checked when the trial starts) | auto
    # (on where the CPU runs bf16 natively, else fp32; result.environment.precision says which ran). Other
    # floats than fp32, so a study compares like with like only at one precision. true/false = on/off.
    cpu_amp: str = warmup_input("off")
    fused_adam: bool = warmup_input(False)  # Adam's fused kernel (4 % faster on the default preset)
    channels_last: bool = True  # on a GPU
    threads: int = 0  # torch intra-op threads on the CPU; 0 -> all cores
    workers: int = 0  # processes for per-image label updates (CRF); 0 -> all cores, 1 -> in-process
    # Processes that prepare training batches ahead of the step (core.loader): N, or 0 (in the training
    # process, between steps), or auto: 0 on the CPU, on CUDA the trial's cores less one (at most 4).
    # Results are bit-identical for any count: the training process still draws every random choice.
    loader_workers: str = "auto"
    # Checkpoint a running trial every this many epochs, and at each stage's start (after its label update),
    # so that a killed trial resumes there (core.checkpoint); 0: no checkpoints. Results do not depend on it.
    checkpoint_every: int = 1
    keep_checkpoint: bool = False  # keep the last checkpoint (the trained network) when the trial ends


@dataclass(frozen=True)
class LabelsConfig:
    cam_threshold: float = 0.2
    sal_threshold: float = 0.06
    sal_crf: bool = True  # Eq. 1 dense CRF on the averaged saliency
    sal_binarize: float = 0.5  # saliency pseudo labels are binarised here before the loss (authors)
    # Max-normalise the affinity-refined CAM again before cam_threshold (A_CT averages the peaks down);
    # the authors' label update normalises only before the affinity product.
    refined_cam_renorm: bool = True


@dataclass(frozen=True)
class EvalConfig:
    # Predict from the affinity-refined seg logits (Eq. 6-7, the paper's inference) or, false, from the seg
    # branch's own; no effect without an affinity.
    refined: bool = True
    post: bool = True  # compute miou_post (multi-scale + flip + CRF) ...
    post_every_stage: bool = False  # ... after every stage, or only after the last one
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    crf: bool = True
    # Learning curves: val mIoU on this many fixed val images (evenly spaced) after every epoch, a stage's
    # last included (which also gets the whole val set); 0 turns them off. Never changes training.
    curve_images: int = 16
    # Image gallery (core.gallery): this many fixed val images, written when the runner asks for it.
    gallery_images: int = 8


@dataclass(frozen=True)
class Config:
    seed: int = warmup_input(0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def get(self, key: str) -> Any:
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def fingerprint(self, keys: list[str]) -> str:
        """Hash of exactly the named fields (the cache key of what depends on them)."""
        picked = {k: _plain(self.get(k)) for k in sorted(keys)}
        return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


# Presets: overrides on top of the paper/author defaults above.
PRESETS: dict[str, dict[str, Any]] = {
    # A full trial in under a minute on 2 CPU cores, for tests, that learns on every draw: with the pretrained
    # backbone, 64-channel heads, 8 warm-up epochs and 8 per stage on 160 images (data preset smoke) and the
    # default preset's non-local inits, final val mIoU over seeds 0-9 x fp32 / AVX2 fp32 / oneDNN-AVX2 fp32
    # x 1 / 2 threads (bench_smoke, 60 trials) was at least 10.4 (median 14.8) vs 4.1 for predicting
    # background everywhere (tests/test_trial.py asserts a 4-point margin; README "Test suite"). With
    # 16-channel heads it stayed at 8.5; with 24 training images and 2 epochs per stage, at all-background.
    "smoke": {
        "data.preset": "smoke",
        "model.width": 0.0625,
        "model.init_weights": "synthetic",  # core/weights/resnet38_synthetic_w0.0625.pt (core.pretrain)
        "model.dropout": 0.0,
        "model.block_dropout": False,
        "model.dilations": (1, 2, 3),
        # 8 warm-up epochs (was 4): the weak draws were weak CAMs. Initial pseudo-label mIoU over seeds 0-9
        # (oneDNN-AVX2 path, 2 threads) min 17.1 / mean 25.2 % after 4 epochs, 27.9 / 36.0 % after 8, for 3 s
        # more per trial; seed 1's stage 0 had stayed at 5.3-5.8 % on every CPU path (issue #38).
        "train.warmup_epochs": 8,
        "train.optimizer": "adam",
        "train.warmup_lr": 0.001,
        "model.head_channels": 64,
        "train.stage_epochs": 8,
        "train.stages": 2,
        "train.batch_size": 8,
        "train.lr": 0.0003,
        "train.warmup_head_lr_mult": 1.0,
        "train.crop": 64,
        "eval.scales": (0.75, 1.0),
        # The default preset's non-local inits and common random heads: the smoke trial then learns on every
        # draw. bench_smoke (code 5651e4e, 4 warm-up epochs), seeds 0-9, AVX2 fp32, 1 thread: min 10.2 /
        # median 15.1 with them vs 4.1 (collapsed) / 8.5 for the preset before, all-background 4.1.
        "model.nonlocal_tied_init": True,
        "model.nonlocal_zero_init": True,
        "model.head_streams": True,
    },
    # The embedded benchmark: the README's main job on 2 CPU cores.
    "default": {
        "data.preset": "default",
        "model.width": 0.125,
        # Every trial starts from core/weights/resnet38_synthetic_w0.125.pt (core.pretrain), the benchmark's
        # stand-in for ImageNet weights (full model, stage-0 val mIoU over seeds 0/1/2: README "Results").
        "model.init_weights": "synthetic",
        "model.dropout": 0.0,
        "model.block_dropout": False,
        "model.dilations": (2, 4, 6),  # 12x12 maps: rate 18 would read only zero padding
        # 128 * 0.125 = 16 channels is a bottleneck for 21 classes: after stage 0 the seg branch's train
        # predictions reached 14 % mIoU against the true masks with 16 channels and 37 % with 64.
        "model.head_channels": 64,
        # 10 warm-up epochs and 8 per stage (was 20 and 15): the main job in about half the time. The initial
        # pseudo labels are as good after 10 warm-up epochs (mIoU 48.8 / 48.4 / 48.0 vs 49.5 / 47.7 / 48.5
        # after 20, seeds 0/1/2); at 8 stage epochs the full model beats seg on 3/3 seeds with the two
        # non-local inits below, at 7 on 2/3 and at 6 on 0/3 (README "Results").
        "train.warmup_epochs": 10,
        # One CAM network and backbone start for every seed (the warm-up of seed 0), as the released pipeline
        # computes its initial labels once. bench_variance, seeds 0-5: the CAM network's share of the paired
        # variance was nil (seg+sal 0.00 [-0.10, +0.12], full model -0.11 [-0.24, +0.07] points² vs seg), and
        # in the adaptive Table 3 seed 7's own warm-up dropped seg alone by 2 points: sharing loses no
        # precision and saves a warm-up per seed; "" draws one per seed (README "Studies").
        "train.warmup_seed": "0",
        "train.optimizer": "adam",
        "train.warmup_lr": 0.001,
        "train.stage_epochs": 8,
        "train.stages": 2,
        "train.batch_size": 8,
        "train.lr": 0.0001,  # heads at 10x: 1e-3
        "train.warmup_head_lr_mult": 1.0,  # Adam warm-up from scratch: one lr for backbone and fc8
        "train.workers": 1,  # 96 px images: per-image CRF is cheaper than the pool's IPC (bench_trial: 0.46x)
        # bf16 where the CPU runs it natively. bench_study ablation_tasks, bf16 with 1 thread vs fp32 with 2,
        # same code, 15 (row, seed) pairs: paired -0.4 [-0.9, +0.1] points, the main job 1.94x faster cold
        # (with 2 single-threaded trials at once; README "Time").
        "train.cpu_amp": "auto",
        "model.head_streams": True,
        # The affinity starts as a similarity of the task's features and the non-local feature update as the
        # identity: with the authors' random init the cross-task affinity was still learning where to look
        # after a stage (foreground positions put 42 % of their attention on cells of their own class), and
        # the full model trailed seg by 2.0 / 2.4 / 3.7 points at 8 epochs; with both inits it leads by
        # 1.1 / 1.1 / 0.5 (seeds 0/1/2, same run; README "Results").
        "model.nonlocal_tied_init": True,
        "model.nonlocal_zero_init": True,
        "train.fused_adam": True,
        "train.crop": 96,
        "eval.scales": (0.75, 1.0, 1.25),
        # As the released code: refined CAMs are not max-normalised again before the threshold. Measured
        # (full model, stage-1 val mIoU, seeds 0/1/2, bench_seeds --stages 2): 42.4/39.4/44.2 without vs
        # 39.3/37.4/43.2 with, paired +2.0 [-0.6, +4.7], 3/3 seeds.
        "labels.refined_cam_renorm": False,
        # The benchmark's classical saliency maps are soft (MAE 0.14), unlike the near-binary deep maps the
        # authors' 0.06 / 0.5 were set for: fuse and binarise at one threshold so the sal branch learns the
        # region the fusion calls salient.
        "labels.sal_threshold": 0.3,
        "labels.sal_binarize": 0.3,
        # Eq. 1's CRF with the authors' VOC parameters shrinks the soft averaged map on 96 px images:
        # stage-1 recall 41.2 % with it vs 58.0 % without (initial 45.7 %, seed 0); see README "Known limits".
        "labels.sal_crf": False,
    },
    # PASCAL VOC with the paper's network and schedule, trained as the authors' released code runs; meant for
    # a GPU (data.root and model.init_weights must be set). README "Paper, released code and presets".
    "paper": {
        "data.name": "voc",
        "data.saliency": "",
        "data.train_split": "train_aug",
        "model.width": 1.0,
        "model.freeze_bn": True,  # BN statistics and affine stay ImageNet's; conv1a frozen (released code)
        "train.optimizer": "sgd",
        # The released poly optimiser passes its weight decay as SGD's third positional argument, momentum:
        # what runs is momentum 1e-5 and weight decay 0. 0.0: each step would carry 1e-5 of the previous
        # one, and SGD keeps no 115 M-float momentum buffer. The paper states neither; the usual SGD with
        # the weight decay the code asks for is one --set away: train.momentum=0.9 train.weight_decay=1e-5.
        "train.momentum": 0.0,
        "train.weight_decay": 0.0,
        "train.fusion_lr_mult": 1.0,  # released: 10x only for names with seg / sal / fc8; cross_att at 1x
        "train.amp": False,  # fp32 as the authors; --set train.amp=true for bf16 autocast (opt-in speed-up)
        # The released pipeline computes the initial pseudo labels once, from one classification network:
        # every seed starts from the warm-up of seed 0 ("" trains one per seed).
        "train.warmup_seed": "0",
        "labels.refined_cam_renorm": False,  # the released label update does not renormalise refined CAMs
    },
}


# String keys that also take true / false (as on / off), for the keys that were booleans before.
ON_OFF_KEYS = {"train.cpu_amp"}


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _section_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a YAML/CLI value to the declared field type or raise a one-line ConfigError."""
    if isinstance(value, str) and typ is not str:
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            raise ConfigError(f"config key '{key}': cannot parse value {value!r}") from None
    if get_origin(typ) is tuple:
        inner = get_args(typ)[0]
        if isinstance(value, str):
            value = [v for v in value.replace("+", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(key, v, inner) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if typ is str:
        if value is None:
            return ""
        if key in ON_OFF_KEYS and str(value).lower() in ("true", "false"):  # YAML's boolean or the word
            return "on" if str(value).lower() == "true" else "off"
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"config key '{key}': unsupported type {typ}")


def warmup_inputs() -> list[str]:
    """The dotted keys of every field marked warmup_input, in declaration order."""
    out = []
    for f in fields(Config):
        if f.metadata.get("warmup"):
            out.append(f.name)
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out += [f"{f.name}.{g.name}" for g in fields(f.default_factory) if g.metadata.get("warmup")]
    return out


def valid_keys() -> list[str]:
    out = []
    for f in fields(Config):
        if (
            dataclasses.is_dataclass(f.default_factory)
            if f.default_factory is not dataclasses.MISSING
            else False
        ):
            out += [f"{f.name}.{g.name}" for g in fields(f.default_factory)]
        else:
            out.append(f.name)
    return out


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return cfg with dotted keys replaced; unknown keys and bad types are a ConfigError."""
    hints = get_type_hints(Config)
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in hints and not dataclasses.is_dataclass(hints[parts[0]]):
            top[parts[0]] = _coerce(key, value, hints[parts[0]])
            continue
        if len(parts) != 2 or parts[0] not in hints or not dataclasses.is_dataclass(hints[parts[0]]):
            raise ConfigError(f"unknown config key '{key}' (valid keys: {', '.join(valid_keys())})")
        sec_types = _section_types(hints[parts[0]])
        if parts[1] not in sec_types:
            raise ConfigError(
                f"unknown config key '{key}' (valid keys under '{parts[0]}': {', '.join(sec_types)})"
            )
        sections.setdefault(parts[0], {})[parts[1]] = _coerce(key, value, sec_types[parts[1]])
    new = {name: replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    return replace(cfg, **top, **new)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["a.b=1", ...]` (the --set syntax) -> {"a.b": "1"}."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def validate(cfg: Config) -> Config:
    """Reject impossible combinations with a one-line error naming the key."""
    m = cfg.model
    try:  # the network's own rules (Tables 3-4), reported under the config key at fault
        branches = check_config(m.branches, m.affinity, m.constraints)[0]
    except SettingError as e:
        raise ConfigError(f"model.{e.key}: {e}") from None
    if len(branches) != len(m.branches):  # the network would drop it; a config names each branch once
        raise ConfigError(f"model.branches has a duplicate: {list(m.branches)}")
    if len(m.dilations) != 3 or any(d < 1 for d in m.dilations):
        raise ConfigError(f"model.dilations must be three positive rates, got {list(m.dilations)}")
    if m.head_channels < 0:
        raise ConfigError(f"model.head_channels must be >= 0 (0: 128 * model.width), got {m.head_channels}")
    if not 0 < m.width <= 4:
        raise ConfigError(f"model.width must be in (0, 4], got {m.width}")
    if cfg.data.name not in ("synthetic", "voc"):
        raise ConfigError(f"data.name: {cfg.data.name!r} is not one of ['synthetic', 'voc']")
    if cfg.data.name == "voc" and not cfg.data.root:
        raise ConfigError("data.root must name your VOC-layout folder when data.name=voc")
    if cfg.data.name == "voc" and m.width == 1.0 and not m.init_weights:
        raise ConfigError(
            "model.init_weights must name the converted ImageNet ResNet38 checkpoint for "
            "data.name=voc at model.width=1.0 (model.init_weights=none trains from scratch)"
        )
    t = cfg.train
    for key in ("warmup_epochs", "stage_epochs", "batch_size", "crop"):
        if getattr(t, key) < (0 if key == "warmup_epochs" else 1):
            raise ConfigError(f"train.{key} must be positive, got {getattr(t, key)}")
    if t.stages < 1:
        raise ConfigError(f"train.stages must be >= 1, got {t.stages}")
    if t.loader_workers != "auto" and not (t.loader_workers.isascii() and t.loader_workers.isdigit()):
        raise ConfigError(
            f"train.loader_workers must be auto or a count >= 0 (0: batches prepared in the training "
            f"process), got {t.loader_workers}"
        )
    if t.warmup_seed and not (t.warmup_seed.isascii() and t.warmup_seed.isdigit()):
        raise ConfigError(
            f"train.warmup_seed must be empty (the trial's seed) or an integer >= 0 (one warm-up shared by "
            f"every seed), got {t.warmup_seed}"
        )
    if t.checkpoint_every < 0:
        raise ConfigError(
            f"train.checkpoint_every must be >= 0 (0: no checkpoints), got {t.checkpoint_every}"
        )
    if cfg.eval.gallery_images < 0:
        raise ConfigError(f"eval.gallery_images must be >= 0 (0: no gallery), got {cfg.eval.gallery_images}")
    if cfg.eval.curve_images < 0:
        raise ConfigError(
            f"eval.curve_images must be >= 0 (0: no learning curves), got {cfg.eval.curve_images}"
        )
    if t.crop < 8:  # any size >= one output-stride cell works: the paper's 321 gives 41x41 maps
        raise ConfigError(f"train.crop must be >= 8 (the output stride), got {t.crop}")
    if t.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"train.optimizer: {t.optimizer!r} is not one of ['sgd', 'adam']")
    if t.cpu_amp not in ("off", "on", "auto"):
        raise ConfigError(f"train.cpu_amp: {t.cpu_amp!r} is not one of ['off', 'on', 'auto'] (or true/false)")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: {t.device!r} is not one of ['auto', 'cpu', 'cuda']")
    if not 0 < t.scale_min <= t.scale_max:
        raise ConfigError(
            f"train.scale_min/scale_max must satisfy 0 < min <= max, got {t.scale_min}, {t.scale_max}"
        )
    for key in ("lr", "warmup_lr"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key} must be > 0, got {getattr(t, key)}")
    if t.fusion_lr_mult < 0:
        raise ConfigError(
            f"train.fusion_lr_mult must be >= 0 (0: train.head_lr_mult), got {t.fusion_lr_mult}"
        )
    for key in ("cls", "sal", "seg"):
        if getattr(cfg.loss, key) < 0:
            raise ConfigError(f"loss.{key} must be >= 0, got {getattr(cfg.loss, key)}")
    for key in ("cam_threshold", "sal_threshold", "sal_binarize"):
        if not 0 <= getattr(cfg.labels, key) <= 1:
            raise ConfigError(f"labels.{key} must be in [0, 1], got {getattr(cfg.labels, key)}")
    if not cfg.eval.scales or any(s <= 0 for s in cfg.eval.scales):
        raise ConfigError(f"eval.scales must be positive numbers, got {list(cfg.eval.scales)}")
    return cfg


def make_config(preset: str = "default", overrides: dict[str, Any] | list[str] | None = None) -> Config:
    """Defaults <- preset <- overrides, validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (expected one of {list(PRESETS)})")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    cfg = apply_overrides(Config(), PRESETS[preset])
    cfg = apply_overrides(cfg, dict(overrides or {}))
    return validate(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from its to_dict() form (e.g. a saved result.json)."""
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return validate(apply_overrides(Config(), flat))
