"""Task losses and the LwF distillation losses, one place for each.

    task_loss(task, outputs, targets, options)   the primary task's supervised loss
    soft_dice_loss(logits, targets)              segmentation's optional second loss term
    distillation_loss(task, student, teacher, weights, temperature)
                                                 what keeps an earlier task alive on its
                                                 replay images (seg KL, det MSE + feature
                                                 MSE, cls KL); zero when student == teacher
"""
import torch
import torch.nn.functional as F

from datasets import VOID
from detection import detection_loss


def task_loss(task, outputs, targets, options=None):
    """Returns (loss, parts): parts maps names to detached scalars for the log.
    options: the task's loss settings: for det the keyword arguments of detection_loss
    (assignment mode, objectness target), for seg {"dice_weight": w}, for cls {"label_smoothing": eps}.
    A part named after the task is its whole loss (seg: cross-entropy + w x Dice; seg_dice is the
    unweighted Dice term alone)."""
    options = options or {}
    if task == "seg":
        logits = outputs["seg"].float()  # once: under autocast a full-size copy
        loss, parts = F.cross_entropy(logits, targets.long(), ignore_index=VOID), {}
        if options.get("dice_weight", 0.0) > 0:
            dice = soft_dice_loss(logits, targets)
            loss, parts = loss + options["dice_weight"] * dice, {"seg_dice": dice.detach()}
        return loss, {"seg": loss.detach(), **parts}
    if task == "det":
        loss, parts = detection_loss(outputs["det"], targets, **options)
        return loss, {"det": loss.detach(), **parts}
    if task == "cls":
        loss = F.cross_entropy(outputs["cls"].float(), targets, label_smoothing=options.get("label_smoothing", 0.0))
        return loss, {"cls": loss.detach()}
    raise ValueError(f"unknown task {task!r}")


def soft_dice_loss(logits, targets):
    """1 - the mean soft Dice score of the classes present in `targets` (void pixels ignored).
    Each class counts once, however few pixels it covers, as in mIoU; cross-entropy counts pixels."""
    num_classes = logits.shape[1]
    valid = targets != VOID
    labels = targets.long().where(valid, 0)
    probs = logits.float().softmax(1)
    predicted = torch.einsum("bchw,bhw->c", probs, valid.to(probs.dtype))  # soft pixel count per class
    own_class_probs = probs.gather(1, labels[:, None])[:, 0] * valid
    true_positive = torch.zeros(num_classes, device=logits.device).index_add(0, labels.flatten(),
                                                                             own_class_probs.flatten())
    label_count = torch.bincount(labels[valid], minlength=num_classes).float()
    dice = 2 * true_positive / (predicted + label_count).clamp_min(1e-6)
    present = label_count > 0
    return 1 - dice[present].mean() if present.any() else logits.sum() * 0.0


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
