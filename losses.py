"""Task losses and the LwF distillation losses, one place for each.

    task_loss(task, outputs, targets)            the primary task's supervised loss
    distillation_loss(task, student, teacher, weights, temperature)
                                                 what keeps an earlier task alive on its
                                                 replay images (seg KL, det MSE + feature
                                                 MSE, cls KL); zero when student == teacher
"""
import torch.nn.functional as F

from datasets import VOID
from detection import detection_loss


def task_loss(task, outputs, targets, options=None):
    """Returns (loss, parts): parts maps names to detached scalars for the log.
    options: the task's loss settings: for det the keyword arguments of detection_loss
    (assignment mode, objectness target), for cls {"label_smoothing": eps}."""
    options = options or {}
    if task == "seg":
        loss = F.cross_entropy(outputs["seg"].float(), targets.long(), ignore_index=VOID)
        return loss, {"seg": loss.detach()}
    if task == "det":
        loss, parts = detection_loss(outputs["det"], targets, **options)
        return loss, {"det": loss.detach(), **parts}
    if task == "cls":
        loss = F.cross_entropy(outputs["cls"].float(), targets, label_smoothing=options.get("label_smoothing", 0.0))
        return loss, {"cls": loss.detach()}
    raise ValueError(f"unknown task {task!r}")


def kl_with_temperature(student_logits, teacher_logits, temperature, dim=1):
    """Hinton's soft-target KL, scaled by T^2 so its gradient size does not depend on T."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=dim)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=dim)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim)
    return kl.mean() * temperature ** 2


def distillation_loss(task, student, teacher, weights, temperature):
    """student / teacher: output dicts of the model on the same replay images of `task`.

    weights: dict with seg, det_logits, det_feature, cls. Segmentation is distilled on
    the stride-16 logits (what the 1x1 head produces before the bilinear upsampling), so
    teacher outputs stay small enough to precompute."""
    if task == "seg":
        loss = weights["seg"] * kl_with_temperature(student["seg_coarse"], teacher["seg_coarse"], temperature)
        return loss, {"distill_seg": loss.detach()}
    if task == "det":
        logits = weights["det_logits"] * F.mse_loss(student["det"].float(), teacher["det"].float())
        feature = weights["det_feature"] * F.mse_loss(student["feat"].float(), teacher["feat"].float())
        return logits + feature, {"distill_det": logits.detach(), "distill_feat": feature.detach()}
    if task == "cls":
        loss = weights["cls"] * kl_with_temperature(student["cls"], teacher["cls"], temperature)
        return loss, {"distill_cls": loss.detach()}
    raise ValueError(f"unknown task {task!r}")
