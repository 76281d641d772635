"""Training loops: the classification warm-up and one multi-task stage. Plain SGD + poly decay."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from core.config import Config
from core.data import VOCDataset, paired_random_transform
from core.loader import BatchLoader
from core.losses import auxsegnet_loss, cls_loss
from core.model import AuxSegNet, Classifier


class NonFiniteLoss(FloatingPointError):
    """A NaN/inf loss: the trial stops and is recorded as failed with this message."""


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(want)


@functools.cache  # autocast() asks before every network pass; the answer is the CPU's
def cpu_bf16_supported() -> bool:
    """oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere bf16 would be emulated, slowly."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_amp(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu" and cfg.train.cpu_amp == "on" and not cpu_bf16_supported():
        raise RuntimeError(
            f"train.cpu_amp=on: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 "
            "(AVX512-BF16 or AMX); use train.cpu_amp=off or auto"
        )


def bf16_active(cfg: Config, device: torch.device) -> bool:
    """Whether the trial's network passes run in bf16 autocast (train.amp on a GPU, train.cpu_amp on the
    CPU, where auto means: if the CPU runs bf16 natively)."""
    if device.type == "cuda":
        return cfg.train.amp
    if device.type == "cpu":
        return cfg.train.cpu_amp == "on" or (cfg.train.cpu_amp == "auto" and cpu_bf16_supported())
    return False


def autocast(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on a GPU when train.amp (an opt-in speed-up for the paper preset, which trains in fp32
    as the authors), and on the CPU when train.cpu_amp; otherwise fp32."""
    if bf16_active(cfg, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(net: torch.nn.Module, cfg: Config, device: torch.device) -> torch.nn.Module:
    net = net.to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / max(total, 1)) ** power


def make_optimizer(
    net: Classifier | AuxSegNet,
    lr: float,
    head_lr_mult: float,
    cfg: Config,
    fusion_lr_mult: float | None = None,
) -> torch.optim.Optimizer:
    """SGD (momentum train.momentum) or Adam over the net's parameter groups (frozen parameters are not in
    them); ``fusion_lr_mult`` puts AuxSegNet's cross_att at its own multiple of lr."""
    extra = {} if fusion_lr_mult is None else {"fusion_lr_mult": fusion_lr_mult}
    groups = net.param_groups(lr, head_lr_mult=head_lr_mult, weight_decay=cfg.train.weight_decay, **extra)
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.train.optimizer == "adam":
        # train.fused_adam: one fused kernel for all parameters instead of a loop of small ops (4 % of a
        # default-preset step); other float rounding, so it is a config key.
        return torch.optim.Adam(groups, lr=lr, fused=cfg.train.fused_adam)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.train.momentum)


def stage_optimizer(net: AuxSegNet, cfg: Config) -> torch.optim.Optimizer:
    """The stage-training optimiser: backbone at train.lr, heads at train.head_lr_mult x, cross_att at
    train.fusion_lr_mult x (0: with the heads)."""
    t = cfg.train
    return make_optimizer(net, t.lr, t.head_lr_mult, cfg, fusion_lr_mult=t.fusion_lr_mult or t.head_lr_mult)


def set_poly(opt: torch.optim.Optimizer, step: int, total: int, power: float) -> None:
    for g in opt.param_groups:
        g["lr"] = poly_lr(g["initial_lr"], step, total, power)


def batches(
    ds: VOCDataset,
    cfg: Config,
    rng: np.random.Generator,
    extra: Callable[[int], dict] | None = None,
    loader: BatchLoader | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of augmented batches; `extra(i)` adds per-image label maps (uint8 HxW) to transform.
    With a loader that has workers, they prepare the batches ahead (on its device, bit for bit these)."""
    if loader is not None and loader.workers:
        yield from loader.epoch(ds, cfg, rng, extra)
        return
    order = rng.permutation(len(ds))
    bs = cfg.train.batch_size
    for s in range(0, len(order), bs):
        idx = order[s : s + bs]
        if len(idx) == 1 and s > 0:  # BatchNorm needs more than one sample
            break
        samples = []
        for i in idx:
            sample = {"image": ds.image(i)}
            if extra is not None:
                sample.update(extra(i))
            samples.append(
                paired_random_transform(
                    sample, cfg.train.crop, (cfg.train.scale_min, cfg.train.scale_max), True, rng
                )
            )
        out = {k: torch.from_numpy(np.stack([smp[k] for smp in samples])) for k in samples[0]}
        out["labels"] = torch.from_numpy(np.stack([ds.labels(i) for i in idx]))
        yield out


def _check(loss: torch.Tensor, where: str, terms: dict[str, torch.Tensor] | None = None) -> None:
    if not torch.isfinite(loss):
        detail = ", ".join(f"{k}={v.item():.4g}" for k, v in (terms or {}).items())
        raise NonFiniteLoss(f"non-finite loss at {where}" + (f" ({detail})" if detail else ""))


def train_warmup(
    clf: Classifier,
    ds: VOCDataset,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    loader: BatchLoader | None = None,
) -> None:
    """Classification warm-up: backbone + fc8 on image-level labels only (batches from `loader`'s workers,
    if any)."""
    epochs = cfg.train.warmup_epochs
    per_epoch = max(1, (len(ds) + cfg.train.batch_size - 1) // cfg.train.batch_size)
    total = epochs * per_epoch
    opt = make_optimizer(clf, cfg.train.warmup_lr, cfg.train.warmup_head_lr_mult, cfg)
    clf.train()
    step = 0
    bar = tqdm(total=total, desc="warm-up", leave=False, disable=None)
    for epoch in range(epochs):
        for b in batches(ds, cfg, rng, loader=loader):
            set_poly(opt, step, total, cfg.train.poly_power)
            x = b["image"].to(device)
            with autocast(cfg, device):
                loss = cls_loss(clf(x).float(), b["labels"].to(device))
            _check(loss, f"warm-up epoch {epoch} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()


def train_stage(
    net: AuxSegNet,
    ds: VOCDataset,
    seg_labels: list[np.ndarray],
    sal_targets: list[np.ndarray] | None,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    stage: int,
    on_epoch: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int, dict], None] | None = None,
    resume: dict | None = None,
    loader: BatchLoader | None = None,
) -> dict[str, float]:
    """One stage of multi-task training on the current pseudo labels; returns mean loss terms.
    on_epoch(epoch) runs after each epoch (it may evaluate: the net is put back in training mode), then
    on_checkpoint(epoch, train_state) with what resuming after that epoch needs besides the network and the
    random streams: resume=train_state continues the stage after its epoch train_state["epoch"]. Batches
    come from `loader`'s workers, if any."""
    epochs = cfg.train.stage_epochs
    per_epoch = max(1, (len(ds) + cfg.train.batch_size - 1) // cfg.train.batch_size)
    total = epochs * per_epoch
    opt = stage_optimizer(net, cfg)
    sums: dict[str, float] = {}
    step, first = 0, 0
    if resume is not None:
        opt.load_state_dict(resume["optimizer"])
        sums, step, first = dict(resume["sums"]), resume["step"], resume["epoch"] + 1
    weights = {"cls": cfg.loss.cls, "sal": cfg.loss.sal, "seg": cfg.loss.seg}

    def extra(i: int) -> dict[str, np.ndarray]:
        out = {"seg": seg_labels[i]}
        if sal_targets is not None:
            out["sal"] = sal_targets[i]
        return out

    net.train()
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}", leave=False, disable=None)
    for epoch in range(first, epochs):
        for b in batches(ds, cfg, rng, extra, loader):
            set_poly(opt, step, total, cfg.train.poly_power)
            x = b["image"].to(device)
            if device.type == "cuda" and cfg.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            targets = {k: b[k].to(device) for k in ("labels", "seg", "sal") if k in b}
            with autocast(cfg, device):
                out = net(x)
            out = {k: v.float() for k, v in out.items()}
            loss, terms = auxsegnet_loss(out, targets, weights)
            _check(loss, f"stage {stage} epoch {epoch} step {step}", terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if on_epoch is not None:
            on_epoch(epoch)
            net.train()
        if on_checkpoint is not None:
            on_checkpoint(
                epoch, {"epoch": epoch, "step": step, "sums": dict(sums), "optimizer": opt.state_dict()}
            )
    bar.close()
    return {k: v / max(step, 1) for k, v in sums.items()}
