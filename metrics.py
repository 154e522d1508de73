"""Metric accumulators shared by training-time validation and eval.py.

Each class follows the same small protocol: update() once per batch, compute()
once per dataset, reset() before the next pass. The maths is left to
torchmetrics (and, for detection, to pycocotools through it) so the numbers
match the standard definitions instead of a home-made approximation.

Everything is moved to the CPU on update(): the states are small (a 21x21
confusion matrix, a few boxes per image) and the COCO backend needs CPU data
anyway, so this keeps the accumulators device-agnostic.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchmetrics.detection import MeanAveragePrecision

from datasets import make_loader
from detection import decode
from tasks import PRIMARY_METRIC


class UndefinedMetricError(ValueError):
    """The data seen has nothing the metric is defined on (every pixel void, no ground-truth box)."""


def _no_data_error(name):
    # A score computed from nothing would look like a real 0.0 in a log or table.
    return ValueError(f"{name}.compute() called before any update(): there is nothing to score")


class SegmentationMetric:
    """VOC semantic segmentation: 21 classes (0 = background), `ignore_index` = void."""

    def __init__(self, num_classes=21, ignore_index=255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # One confusion matrix over the whole dataset (rows = ground truth,
        # columns = prediction), as VOC does: per-image IoUs averaged would weight
        # small images and rare classes differently.
        self._confmat = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self._num_updates = 0

    def update(self, pred, target):
        """pred, target: integer tensors of the same shape, (H, W) or (N, H, W)."""
        pred = pred.detach().to("cpu", torch.long)
        target = target.detach().to("cpu", torch.long)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}")
        # torchmetrics only counts unique values: an out-of-range label is silently
        # folded into another cell of the matrix, so check the range here.
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"pred values must be in [0, {self.num_classes - 1}], "
                             f"got [{int(pred.min())}, {int(pred.max())}]")
        valid = target[target != self.ignore_index]
        if valid.numel() and (valid.min() < 0 or valid.max() >= self.num_classes):
            raise ValueError(f"target values must be in [0, {self.num_classes - 1}] or {self.ignore_index}, "
                             f"got [{int(valid.min())}, {int(valid.max())}]")
        self._confmat.update(pred.flatten(), target.flatten())
        self._num_updates += 1

    @staticmethod
    def _iou(cm):
        """Per-class IoU = TP / (TP + FP + FN); None where the union is 0."""
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        return [float(t / u) if u > 0 else None for t, u in zip(tp.tolist(), union.tolist())]

    def confusion_matrix(self):
        """(C, C) counts so far, rows = ground truth, columns = prediction."""
        if self._num_updates == 0:
            raise _no_data_error(type(self).__name__)
        return self._confmat.compute()

    def compute(self):
        return self.scores_from_confusion(self.confusion_matrix())

    @classmethod
    def scores_from_confusion(cls, cm):
        cm = cm.double()
        if cm.sum() == 0:
            raise UndefinedMetricError("SegmentationMetric: every pixel seen so far was void; mIoU is undefined")

        # Standard VOC mIoU: mean over the classes that occur in the ground truth
        # or the prediction somewhere in the dataset. A class absent from both has
        # no IoU at all, so it is left out rather than counted as 0 or 1.
        iou = cls._iou(cm)
        present = [v for v in iou if v is not None]

        # mIoU_fg is the reference README's variant, kept only for comparison with
        # its published numbers: pixels whose ground truth is background are
        # ignored too (row 0 dropped), and the mean is over foreground classes.
        # A foreground pixel predicted as background stays in its class's row, so
        # it still counts as a miss (FN) for that class.
        cm_fg = cm.clone()
        cm_fg[0, :] = 0
        iou_fg = [v for v in cls._iou(cm_fg)[1:] if v is not None]

        return {
            "mIoU": sum(present) / len(present),
            # None if no foreground class occurs at all (undefined, not 0).
            "mIoU_fg": sum(iou_fg) / len(iou_fg) if iou_fg else None,
            "IoU_per_class": iou,
        }

    def reset(self):
        self._confmat.reset()
        self._num_updates = 0


class DetectionMetric:
    """COCO-style AP at IoU 0.5, macro-averaged over classes, crowd boxes ignored."""

    def __init__(self, num_classes=10, class_agnostic=True):
        self.num_classes = num_classes
        # torchmetrics hands the data to pycocotools' COCOeval, so the value is
        # COCO's own AP50 (101-point interpolated precision, crowd handling, at
        # most 100 detections per image and class) rather than a re-implementation.
        # Its default average="macro" is the COCO one: per-class AP, then the mean
        # over classes that have ground truth.
        # rec_thresholds: torchmetrics' default is torch.linspace in float32, which
        # differs from COCO's float64 np.linspace at 96 of the 101 points (0.6 becomes
        # 0.6000000238...). A recall of exactly 3/5 then misses the 0.6 point and AP
        # comes out lower than COCOeval's, so pass COCO's own thresholds.
        options = dict(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5],
                       rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(), backend="pycocotools")
        self._map = MeanAveragePrecision(class_metrics=True, **options)
        # The same with every label set to 0: does the detector find the objects at all,
        # whatever their class? (Separates localisation from classification errors.)
        self._boxes_only = MeanAveragePrecision(**options) if class_agnostic else None
        self._num_images = 0

    def update(self, preds, targets):
        """preds: list of dict(boxes (K,4) xyxy pixels, scores (K,), labels (K,) in 0..num_classes-1).
        targets: list of dict(boxes (M,4) xyxy, labels (M,), optional iscrowd (M,) 0/1, optional
        area (M,): COCO's object area, which sets the size ranges; without it, the box's area)."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        cpu_preds, cpu_targets = [], []
        for p, t in zip(preds, targets):
            # The COCO conversion inside torchmetrics insists on int labels and
            # float scores (it checks the Python type after .tolist()).
            cpu_preds.append({
                "boxes": p["boxes"].detach().to("cpu", torch.float32).reshape(-1, 4),
                "scores": p["scores"].detach().to("cpu", torch.float32).reshape(-1),
                "labels": p["labels"].detach().to("cpu", torch.long).reshape(-1),
            })
            labels = t["labels"].detach().to("cpu", torch.long).reshape(-1)
            iscrowd = t.get("iscrowd")
            # iscrowd marks boxes that COCOeval ignores: a detection matching one
            # is neither a TP nor an FP, and an unmatched one is not a miss.
            iscrowd = torch.zeros_like(labels) if iscrowd is None else iscrowd.detach().to("cpu", torch.long).reshape(-1)
            cpu_targets.append({
                "boxes": t["boxes"].detach().to("cpu", torch.float32).reshape(-1, 4),
                "labels": labels,
                "iscrowd": iscrowd,
            })
            if "area" in t:
                cpu_targets[-1]["area"] = t["area"].detach().to("cpu", torch.float32).reshape(-1)
            for name, lab in (("prediction", cpu_preds[-1]["labels"]), ("target", labels)):
                if lab.numel() and (lab.min() < 0 or lab.max() >= self.num_classes):
                    raise ValueError(f"{name} labels must be in [0, {self.num_classes - 1}], "
                                     f"got [{int(lab.min())}, {int(lab.max())}]")
        self._map.update(cpu_preds, cpu_targets)
        if self._boxes_only is not None:
            self._boxes_only.update([{**p, "labels": torch.zeros_like(p["labels"])} for p in cpu_preds],
                                    [{**t, "labels": torch.zeros_like(t["labels"])} for t in cpu_targets])
        self._num_images += len(preds)

    def compute(self):
        if self._num_images == 0:
            raise _no_data_error(type(self).__name__)
        out = self._map.compute()
        # COCOeval reports -1 where a value is undefined; for the mean that means
        # no class has a non-crowd ground-truth box.
        map50 = float(out["map_50"])
        if map50 < 0:
            raise UndefinedMetricError("DetectionMetric: no non-crowd ground-truth box seen; mAP@0.5 is undefined")
        # With iou_thresholds=[0.5], torchmetrics' per-class "map" is the AP at 0.5.
        # It lists only classes seen in predictions or targets, and squeezes the
        # tensors to 0-d when there is a single class, hence the flatten().
        per_class = [None] * self.num_classes
        for c, ap in zip(out["classes"].flatten().tolist(), out["map_per_class"].flatten().tolist()):
            # -1 marks a class with predictions but no (non-crowd) ground truth.
            per_class[c] = ap if ap >= 0 else None
        scores = {"mAP_50": map50, "AP50_per_class": per_class}
        if self._boxes_only is not None:
            # Class-agnostic: AP@0.5 and recall@0.5 (up to 100 detections per image) of all boxes
            # pooled; a box predicted twice with two classes counts once as a false positive.
            boxes_only = self._boxes_only.compute()
            scores.update(AP50_class_agnostic=float(boxes_only["map_50"]),
                          recall50_class_agnostic=float(boxes_only["mar_100"]))
            # The same recall per COCO size range (the targets' area, else the box's, in original
            # pixels: small < 32^2, medium < 96^2, large beyond); None where the range has no
            # ground truth.
            scores["recall50_class_agnostic_by_size"] = {
                size: (float(boxes_only[f"mar_{size}"]) if boxes_only[f"mar_{size}"] >= 0 else None)
                for size in ("small", "medium", "large")}
        return scores

    def reset(self):
        if self._boxes_only is not None:
            self._boxes_only.reset()
        self._map.reset()
        self._num_images = 0


class ClassificationMetric:
    """Top-1 accuracy over all samples (micro average, not the per-class mean)."""

    def __init__(self, num_classes=10):
        self.num_classes = num_classes
        # average="micro" counts correct samples over all samples; torchmetrics'
        # default "macro" would average per-class recalls instead.
        self._acc = MulticlassAccuracy(num_classes, average="micro", top_k=1)
        self._num_samples = 0

    def update(self, logits, labels):
        """logits: (N, C) scores of any kind (argmax is taken); labels: (N,) class indices."""
        logits = logits.detach().to("cpu", torch.float32)
        labels = labels.detach().to("cpu", torch.long)
        if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
        # As for segmentation, torchmetrics does not range-check the labels.
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes - 1}], got [{int(labels.min())}, {int(labels.max())}]")
        self._acc.update(logits, labels)
        self._num_samples += labels.numel()

    def compute(self):
        if self._num_samples == 0:
            raise _no_data_error(type(self).__name__)
        return {"top1": float(self._acc.compute())}

    def reset(self):
        self._acc.reset()
        self._num_samples = 0


# ----------------------------------------------------------------------------- the evaluation loop
METRICS = {"seg": SegmentationMetric, "det": DetectionMetric, "cls": ClassificationMetric}


def seg_logits_at(coarse_logits, size):
    """(N, C, h, w) stride-16 segmentation logits -> (N, C, *size), before the argmax.

    Bilinear with align_corners=False, the upsampling the model's own full-resolution `seg`
    output uses (models.py), so the scored and drawn masks are the ones the model is trained
    to produce; nearest would move class boundaries by up to half a coarse cell."""
    return F.interpolate(coarse_logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.inference_mode()
def evaluate(model, dataset, task, batch_size=32, bootstrap=0, seed=0):
    """Score `model` on one task's dataset against its original-resolution ground truth.

    Segmentation logits are resized to each image's own mask size (not masks to the
    input); boxes are mapped back to original image pixels. Used by train.py's
    validation and by eval.py, so both report the same numbers (always in float32, so a
    baseline measured during bf16 training compares exactly with eval.py).

    `bootstrap` > 0 adds `<metric>_ci95`: the 2.5 and 97.5 percentiles of the metric over that
    many resamples of the images with replacement (how much the score depends on which
    60 images happen to be in the val set)."""
    model.eval()
    per_image = []  # (prediction, target) of every image, in the form the metric's update() takes
    for images, _, indices in make_loader(dataset, batch_size, shuffle=False):
        outputs = model(model.prepare_input(images))
        indices = indices.tolist()
        if task == "seg":
            for logits, i in zip(outputs["seg_coarse"].float(), indices):
                mask = dataset.eval_target(i)
                logits = seg_logits_at(logits[None], mask.shape)
                per_image.append((logits[0].argmax(0).to(torch.uint8), mask))
        elif task == "det":
            sizes = [dataset.original_size(i) for i in indices]
            per_image += [([pred], [dataset.eval_target(i)]) for pred, i in zip(decode(outputs["det"], sizes), indices)]
        else:
            per_image += [(logits[None], torch.tensor([dataset.eval_target(i)]))
                          for logits, i in zip(outputs["cls"].float(), indices)]
    scores = score_images(task, per_image)
    if bootstrap:
        scores[f"{PRIMARY_METRIC[task]}_ci95"] = bootstrap_interval(task, per_image, bootstrap, seed)
    return scores


def filled_metric(task, per_image, **options):
    """The task's metric (built with `options`) after update() with every (prediction, target) pair."""
    metric = METRICS[task](**options)
    for prediction, target in per_image:
        metric.update(prediction, target)
    return metric


def score_images(task, per_image, **options):
    return filled_metric(task, per_image, **options).compute()


def bootstrap_interval(task, per_image, resamples, seed=0):
    """[2.5, 97.5] percentiles of the task's metric over image resamples drawn with replacement."""
    if task == "seg":  # one confusion matrix per image, summed per resample (the same mIoU, much faster)
        matrices = torch.stack([filled_metric(task, [item]).confusion_matrix() for item in per_image])

        def score(picks):
            return SegmentationMetric.scores_from_confusion(matrices[picks].sum(0))["mIoU"]
    else:
        # Only the primary metric is resampled: skip detection's class-agnostic second COCOeval.
        options = {"class_agnostic": False} if task == "det" else {}

        def score(picks):
            return score_images(task, [per_image[i] for i in picks], **options)[PRIMARY_METRIC[task]]
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(resamples):
        picks = torch.randint(len(per_image), (len(per_image),), generator=generator).tolist()
        try:
            values.append(score(picks))
        except UndefinedMetricError:  # a resample without any ground truth (tiny sets only): no score
            continue
    if not values:
        raise ValueError(f"bootstrap: no resample of the {len(per_image)} {task} images could be scored")
    low, high = np.percentile(values, [2.5, 97.5])
    return [float(low), float(high)]
