"""bench.bench_affinity's attention purity: the share of a foreground cell's attention on its own class."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.bench_affinity import IGNORE, STRIDE, attention_purity, cell_classes


def test_cell_classes_take_the_majority_and_skip_ignore():
    mask = np.zeros((2 * STRIDE, 2 * STRIDE), np.uint8)
    mask[:STRIDE, :STRIDE] = 3  # cell 0: class 3
    mask[:STRIDE, STRIDE : STRIDE + 3] = 5  # cell 1: 24 of 64 pixels class 5, the rest background
    mask[STRIDE:, :STRIDE] = IGNORE  # cell 2: only ignore
    mask[STRIDE:, STRIDE:] = IGNORE
    mask[STRIDE, STRIDE] = 7  # cell 3: one labelled pixel, class 7
    assert cell_classes(mask, 2, 2).tolist() == [3, 0, IGNORE, 7]


def test_cell_classes_pad_a_partial_cell_with_ignore():
    mask = np.full((STRIDE + 1, STRIDE), 2, np.uint8)  # 9 rows: ceil(9 / 8) = 2 cells high
    assert cell_classes(mask, 2, 1).tolist() == [2, 2]


def test_purity_of_identity_uniform_and_unnormalised_affinities():
    cells = np.array([0, 1, 1, 2, IGNORE, 0])
    fg = [1, 2, 3]  # foreground cells: classes 1, 1, 2
    ident = attention_purity(torch.eye(6), cells)
    assert ident.n == 3 and ident.share("own") == 1.0 and ident.share("self_weight") == 1.0
    uniform = attention_purity(torch.full((6, 6), 1 / 6), cells)
    chance = np.mean([(cells == cells[i]).sum() / 6 for i in fg])
    assert uniform.share("own") == pytest.approx(chance) and uniform.share("chance") == pytest.approx(chance)
    # Eq. 5's A_CT rows do not sum to 1: the share is taken of the row's own sum.
    a = torch.zeros(6, 6)
    a[1, 2], a[1, 0] = 0.9, 0.3  # cell 1: 0.9 of 1.2 on class 1
    a[2, 2], a[3, 3], a[0, 0], a[4, 4], a[5, 5] = 1.0, 0.5, 1.0, 1.0, 1.0
    a[5, 1] = 3.0  # background cell 5: 1 of 4 on background
    p = attention_purity(a, cells)
    assert p.share("own") == pytest.approx((0.75 + 1 + 1) / 3)
    assert p.share("self_weight") == pytest.approx((0 + 1 + 1) / 3)
    assert p.n_bg == 2 and p.share("bg") == pytest.approx((1 + 0.25) / 2)


def test_purity_without_foreground_is_empty():
    p = attention_purity(torch.eye(3), np.array([0, 0, IGNORE]))
    assert p.n == 0 and np.isnan(p.share("own")) and p.share("bg") == 1.0


def test_bench_refuses_a_bad_setting_before_training(tmp_path, capsys):
    from bench.bench_affinity import main

    assert main(["--dir", str(tmp_path), "--set", "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written
