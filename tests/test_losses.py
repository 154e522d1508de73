"""losses.py: the distillation and task losses against hand computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import distillation_loss, kl_with_temperature, task_loss


def test_kl_with_temperature_by_hand():
    student, teacher, T = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), 2.0
    p = torch.softmax(teacher / T, 1)[0]      # teacher's soft targets
    expected = T ** 2 * sum(p[k] * math.log(p[k] / 0.5) for k in range(2))   # KL(teacher || student)
    assert kl_with_temperature(student, teacher, T).item() == pytest.approx(float(expected), rel=1e-5)


def test_distillation_weights_scale_their_own_terms():
    torch.manual_seed(0)
    s = {k: torch.randn(2, 15, 4, 4) for k in ("det", "feat")} | {"seg_coarse": torch.randn(2, 21, 4, 4)}
    t = {k: torch.randn_like(v) for k, v in s.items()}
    seg, _ = distillation_loss("seg", s, t, {"seg": 4.0}, 2.0)
    assert seg.item() == pytest.approx(4 * kl_with_temperature(s["seg_coarse"], t["seg_coarse"], 2.0).item(), rel=1e-5)
    det, parts = distillation_loss("det", s, t, {"det_logits": 0.0, "det_feature": 1.0}, 2.0)
    assert parts["distill_det"].item() == 0.0
    assert det.item() == pytest.approx(F.mse_loss(s["feat"], t["feat"]).item(), rel=1e-5)


def test_segmentation_loss_ignores_void_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 21, 2, 2)
    targets = torch.tensor([[[3, 255], [255, 7]]])
    loss, _ = task_loss("seg", {"seg": logits}, targets)
    expected = F.cross_entropy(logits[0, :, [0, 1], [0, 1]].T, torch.tensor([3, 7]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
