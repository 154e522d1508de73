"""Unit tests for metrics.py on small hand-made cases (CPU, a few seconds).

Each expected value is worked out by hand in a comment, so a wrong definition
(per-image averaging, absent classes counted as 0, crowd boxes not ignored, ...)
fails a test instead of passing quietly.
"""

import contextlib
import io

import pytest
import torch

from metrics import ClassificationMetric, DetectionMetric, SegmentationMetric, evaluate
from test_detection import GRID, cell_map

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- segmentation

def seg(pred, target, **kw):
    m = SegmentationMetric(**kw)
    m.update(torch.tensor(pred), torch.tensor(target))
    return m.compute()


@pytest.mark.parametrize("device", DEVICES)
def test_seg_perfect(device):
    t = torch.tensor([[0, 0, 1, 1], [2, 2, 20, 20]], device=device)
    m = SegmentationMetric()
    m.update(t.clone(), t)
    r = m.compute()
    assert r["mIoU"] == 1.0 and r["mIoU_fg"] == 1.0
    assert isinstance(r["mIoU"], float)
    assert len(r["IoU_per_class"]) == 21
    assert [c for c, v in enumerate(r["IoU_per_class"]) if v is not None] == [0, 1, 2, 20]


def test_seg_partial_overlap_hand_computed():
    target = [[0, 0, 0, 0, 1, 1, 2, 2]]
    pred = [[0, 0, 1, 1, 1, 2, 2, 2]]
    # class 0: TP 2, GT 4, pred 2 -> 2 / (4 + 2 - 2) = 1/2
    # class 1: TP 1, GT 2, pred 3 -> 1 / (2 + 3 - 1) = 1/4
    # class 2: TP 2, GT 2, pred 3 -> 2 / (2 + 3 - 2) = 2/3
    r = seg(pred, target)
    assert r["IoU_per_class"][:3] == pytest.approx([1 / 2, 1 / 4, 2 / 3])
    # mean over the 3 classes present, not over all 21
    assert r["mIoU"] == pytest.approx((1 / 2 + 1 / 4 + 2 / 3) / 3)


def test_seg_void_ignored():
    target = [[0, 0, 0, 0, 1, 1, 2, 2, 255, 255, 255]]
    pred = [[0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 20]]  # predictions on void pixels must not count
    r = seg(pred, target)
    assert r["mIoU"] == pytest.approx((1 / 2 + 1 / 4 + 2 / 3) / 3)
    assert r["IoU_per_class"][20] is None  # predicted only on void: union 0 -> excluded


def test_seg_absent_class_excluded_but_false_positive_class_counted():
    # Class 3 appears only in the prediction: IoU 0, and it counts in the mean.
    # Classes 4..20 appear nowhere: None, excluded from the mean.
    target = [[0, 0, 1, 1]]
    pred = [[0, 3, 1, 1]]
    # class 0: TP 1, GT 2, pred 1 -> 1/2 ; class 1: 1 ; class 3: 0 / 1 = 0
    r = seg(pred, target)
    assert r["IoU_per_class"][:4] == pytest.approx([1 / 2, 1.0, None, 0.0])
    assert all(v is None for v in r["IoU_per_class"][4:])
    assert r["mIoU"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_seg_mIoU_fg_ignores_background_pixels():
    target = [[0, 0, 1, 1, 1, 2, 2]]
    pred = [[1, 2, 0, 1, 1, 2, 2]]
    # Standard: class 0: TP 0, GT 2, pred 1 -> 0 ; class 1: TP 2, GT 3, pred 3 -> 2/4 ;
    #           class 2: TP 2, GT 2, pred 3 -> 2/3
    # fg variant drops the two background-GT pixels (their wrong 1 and 2 no longer
    # count as FP), but the class-1 pixel predicted as 0 is still a miss:
    #           class 1: TP 2, GT 3, pred 2 -> 2/3 ; class 2: TP 2, GT 2, pred 2 -> 1
    r = seg(pred, target)
    assert r["mIoU"] == pytest.approx((0 + 1 / 2 + 2 / 3) / 3)
    assert r["mIoU_fg"] == pytest.approx((2 / 3 + 1) / 2)


def test_seg_accumulates_one_confusion_matrix_over_dataset():
    # Image A perfect (four 1s); image B: four 1s, one predicted right.
    # Dataset: class 1 TP 5, GT 8, pred 5 -> 5/8 ; class 0 TP 0, GT 0, pred 3 -> 0.
    # (A mean of per-image mIoUs would give (1 + (1/4 + 0) / 2) / 2 = 0.5625.)
    a_t, a_p = torch.ones(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.long)
    b_t, b_p = torch.ones(2, 2, dtype=torch.long), torch.tensor([[1, 0], [0, 0]])
    m = SegmentationMetric()
    m.update(a_p, a_t)
    m.update(b_p, b_t)
    expected = (5 / 8 + 0) / 2
    assert m.compute()["mIoU"] == pytest.approx(expected)
    # A batch (N, H, W) gives the same as image by image.
    m.reset()
    m.update(torch.stack([a_p, b_p]), torch.stack([a_t, b_t]))
    assert m.compute()["mIoU"] == pytest.approx(expected)


def test_seg_rejects_out_of_range_values():
    # torchmetrics alone would fold these into a wrong cell without complaint.
    m = SegmentationMetric()
    with pytest.raises(ValueError):
        m.update(torch.tensor([[0, 21]]), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError):
        m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 30]]))
    with pytest.raises(ValueError):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- detection

def P(boxes, scores, labels):
    return dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                scores=torch.tensor(scores, dtype=torch.float32), labels=torch.tensor(labels, dtype=torch.long))


def T(boxes, labels, iscrowd=None):
    labels = torch.tensor(labels, dtype=torch.long)
    return dict(boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels=labels,
                iscrowd=torch.zeros_like(labels) if iscrowd is None else torch.tensor(iscrowd, dtype=torch.long))


def det(preds, targets):
    m = DetectionMetric()
    m.update(preds, targets)
    return m.compute()


A = [10.0, 10.0, 50.0, 60.0]
B = [100.0, 20.0, 160.0, 90.0]
C = [30.0, 100.0, 90.0, 180.0]


@pytest.mark.parametrize("device", DEVICES)
def test_det_perfect(device):
    preds = [P([A, B], [0.9, 0.8], [0, 3]), P([C], [0.7], [9])]
    targets = [T([A, B], [0, 3]), T([C], [9])]
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    r = det([to(p) for p in preds], [to(t) for t in targets])
    assert r["mAP_50"] == pytest.approx(1.0)
    assert isinstance(r["mAP_50"], float)
    assert len(r["AP50_per_class"]) == 10
    assert [c for c, v in enumerate(r["AP50_per_class"]) if v is not None] == [0, 3, 9]


def test_det_image_without_predictions():
    # Image 2 has a GT box and no prediction: recall stops at 1/2 with precision 1,
    # so 51 of COCO's 101 recall points (0.00 .. 0.50) score 1 -> AP = 51/101.
    r = det([P([A], [0.9], [0]), P([], [], [])], [T([A], [0]), T([B], [0])])
    assert r["mAP_50"] == pytest.approx(51 / 101, abs=1e-6)


def test_det_image_without_ground_truth():
    # Image 2 has no GT; its detection is an FP ranked above the TP:
    # precision is 1/2 at recall 1 and 0 before it, interpolated to 1/2 everywhere.
    r = det([P([A], [0.9], [0]), P([B], [0.95], [0])], [T([A], [0]), T([], [])])
    assert r["mAP_50"] == pytest.approx(0.5, abs=1e-6)


def test_det_crowd_boxes_ignored():
    # Image 1: a crowd box nobody detects must not count as a miss.
    # Image 2: the top-scoring detection lies on a crowd box: not an FP (and not a TP).
    preds = [P([A], [0.9], [0]), P([C, A], [0.99, 0.8], [0, 0])]
    targets = [T([A, B], [0, 0], iscrowd=[0, 1]), T([A, C], [0, 0], iscrowd=[0, 1])]
    assert det(preds, targets)["mAP_50"] == pytest.approx(1.0)
    # Same data with iscrowd dropped: the crowd boxes become ordinary GT and AP falls.
    plain = [{k: v for k, v in t.items() if k != "iscrowd"} for t in targets]
    assert det(preds, plain)["mAP_50"] < 0.99


def test_det_class_with_only_crowd_gt_has_no_ap():
    r = det([P([A, B], [0.9, 0.8], [0, 1])], [T([A, B], [0, 1], iscrowd=[0, 1])])
    assert r["mAP_50"] == pytest.approx(1.0)
    assert r["AP50_per_class"][1] is None


def test_det_wrong_class():
    # Right box, wrong label: class 1 has GT but no detection (AP 0); class 2 has
    # a detection but no GT (no AP, excluded from the mean).
    r = det([P([A], [0.9], [2])], [T([A], [1])])
    assert r["mAP_50"] == 0.0
    assert r["AP50_per_class"][1] == 0.0 and r["AP50_per_class"][2] is None
    # With a second, correctly detected class the mean is over the 2 GT classes.
    r = det([P([A, B], [0.9, 0.9], [2, 4])], [T([A, B], [1, 4])])
    assert r["mAP_50"] == pytest.approx(0.5)
    # Class-agnostic, both boxes were found: a classification error, not a localisation one.
    assert r["AP50_class_agnostic"] == pytest.approx(1.0) and r["recall50_class_agnostic"] == pytest.approx(1.0)


def test_det_class_agnostic_scores_can_be_left_out():
    m = DetectionMetric(class_agnostic=False)  # what the bootstrap resamples use
    m.update([P([A], [0.9], [2])], [T([A], [1])])
    assert m.compute().keys() == {"mAP_50", "AP50_per_class"}


def test_det_class_agnostic_scores_count_missed_boxes():
    far = [200.0, 200.0, 240.0, 240.0]
    r = det([P([A, far], [0.9, 0.8], [1, 1])], [T([A, B], [1, 4])])
    assert r["recall50_class_agnostic"] == pytest.approx(0.5)
    assert r["AP50_class_agnostic"] == pytest.approx(51 / 101)  # COCO: precision 1 at 51 of 101 recall points


def test_det_class_agnostic_recall_by_coco_size_range():
    small, medium, large = [0.0, 0.0, 20.0, 20.0], [100.0, 100.0, 160.0, 160.0], [200.0, 0.0, 400.0, 200.0]
    r = det([P([large, medium], [0.9, 0.8], [0, 0])], [T([small, medium, large], [0, 0, 0])])
    assert r["recall50_class_agnostic_by_size"] == {"small": 0.0, "medium": 1.0, "large": 1.0}
    r = det([P([small], [0.9], [0])], [T([small], [0])])   # no medium or large ground truth
    assert r["recall50_class_agnostic_by_size"] == {"small": 1.0, "medium": None, "large": None}


def test_det_size_ranges_follow_the_targets_coco_area_over_the_box():
    # COCO puts an object in a size range by its annotation's area (its mask), not its box: a
    # 60 x 60 box (medium by its box) whose object covers 900 px is a small object.
    box = [0.0, 0.0, 60.0, 60.0]
    target = {**T([box], [0]), "area": torch.tensor([900.0])}
    r = det([P([box], [0.9], [0])], [target])
    assert r["recall50_class_agnostic_by_size"] == {"small": 1.0, "medium": None, "large": None}
    r = det([P([box], [0.9], [0])], [T([box], [0])])  # no area given: the box's
    assert r["recall50_class_agnostic_by_size"] == {"small": None, "medium": 1.0, "large": None}


def test_det_hand_computed_ap():
    # Two GT boxes of class 0; detections by score: TP (0.9), FP (0.8), TP (0.7).
    # (precision, recall) = (1, 1/2), (1/2, 1/2), (2/3, 1). Interpolated precision is
    # 1 for recall <= 0.5 (51 points) and 2/3 above (50 points):
    # AP = (51 + 50 * 2/3) / 101.
    near_a = [12.0, 12.0, 50.0, 60.0]   # IoU with A = 38*48 / (40*50) = 0.912
    off_a = [40.0, 50.0, 90.0, 100.0]   # IoU with A = 10*10 / (2000 + 2500 - 100) = 0.023
    preds = [P([near_a, off_a, B], [0.9, 0.8, 0.7], [0, 0, 0])]
    r = det(preds, [T([A, B], [0, 0])])
    assert r["mAP_50"] == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-6)
    assert r["AP50_per_class"][0] == pytest.approx(r["mAP_50"], abs=1e-6)


def test_det_recall_on_a_recall_threshold_counts():
    # 5 GT boxes, 3 found exactly, no FP: precision 1 up to recall 3/5, so the 61
    # recall points 0.00 .. 0.60 score 1 -> AP = 61/101. torchmetrics' default
    # float32 recall thresholds put 0.6 just above 3/5 and would give 60/101.
    gts = [[10.0 + 100 * i, 10.0, 60.0 + 100 * i, 80.0] for i in range(5)]
    r = det([P(gts[:3], [0.9, 0.8, 0.7], [0, 0, 0])], [T(gts, [0] * 5)])
    assert r["mAP_50"] == pytest.approx(61 / 101, abs=1e-6)


def _coco_ap50(preds, targets, num_classes):
    """AP50 and per-class AP50 from pycocotools' COCOeval, built directly from COCO dicts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):  # same float32 arithmetic as the metric's own conversion
        b = b.to(torch.float32)
        return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1).tolist()

    images, anns, dets = [], [], []
    for img_id, (p, t) in enumerate(zip(preds, targets), start=1):
        images.append({"id": img_id, "width": 640, "height": 480})
        for box, lab, crowd in zip(xywh(t["boxes"]), t["labels"].tolist(), t["iscrowd"].tolist()):
            # annotation ids start at 1: COCOeval uses 0 for "unmatched"
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": lab + 1, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": crowd})
        for box, lab, s in zip(xywh(p["boxes"]), p["labels"].tolist(), p["scores"].tolist()):
            dets.append({"image_id": img_id, "category_id": lab + 1, "bbox": box, "score": s})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")  # default iouThrs 0.50:0.95, maxDets 100
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # precision[T, R, K, A, M]: IoU 0.5 is index 0, area "all" index 0, maxDets 100 index 2
    per_class = []
    for k in range(num_classes):
        pr = ev.eval["precision"][0, :, k, 0, 2]
        per_class.append(float(pr[pr > -1].mean()) if (pr > -1).any() else None)
    return float(ev.stats[1]), per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_det_matches_pycocotools_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    num_classes = 10

    def rand_box(n):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([560.0, 400.0])
        wh = 8 + torch.rand(n, 2, generator=g) * 120
        return torch.cat([xy, xy + wh], 1)

    preds, targets = [], []
    for _ in range(20):
        m = int(torch.randint(0, 6, (1,), generator=g))  # some images have no GT
        gt_boxes = rand_box(m)
        gt_labels = torch.randint(0, num_classes, (m,), generator=g)
        iscrowd = (torch.rand(m, generator=g) < 0.15).long()
        # noisy copies of most GT boxes (jitter up to ~25% of the size, sometimes
        # the wrong class), plus a few random false positives
        keep = torch.rand(m, generator=g) < 0.8
        wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).repeat(1, 2)
        noisy = gt_boxes + (torch.rand(m, 4, generator=g) - 0.5) * 0.5 * wh
        noisy_labels = torch.where(torch.rand(m, generator=g) < 0.8, gt_labels,
                                   torch.randint(0, num_classes, (m,), generator=g))
        k = int(torch.randint(0, 4, (1,), generator=g))
        boxes = torch.cat([noisy[keep], rand_box(k)])
        labels = torch.cat([noisy_labels[keep], torch.randint(0, num_classes, (k,), generator=g)])
        scores = torch.rand(len(boxes), generator=g)
        preds.append(dict(boxes=boxes, scores=scores, labels=labels))
        targets.append(dict(boxes=gt_boxes, labels=gt_labels, iscrowd=iscrowd))

    ref_map, ref_per_class = _coco_ap50(preds, targets, num_classes)
    m = DetectionMetric(num_classes)
    m.update(preds[:7], targets[:7])  # several updates, as in a validation loop
    m.update(preds[7:], targets[7:])
    r = m.compute()
    assert 0.0 < ref_map < 1.0  # a non-trivial case
    assert r["mAP_50"] == pytest.approx(ref_map, abs=1e-6)
    for ours, ref in zip(r["AP50_per_class"], ref_per_class):
        assert (ours is None) == (ref is None)
        if ref is not None:
            assert ours == pytest.approx(ref, abs=1e-6)


# --------------------------------------------------------------------------- classification

@pytest.mark.parametrize("device", DEVICES)
def test_cls_top1(device):
    logits = torch.tensor([[5.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [4.0, 0.0, -1.0]], device=device)
    labels = torch.tensor([0, 0, 0, 1], device=device)
    # argmax per row: 0, 0, 1, 0 -> rows 0 and 1 right, rows 2 and 3 wrong: 2/4
    m = ClassificationMetric(num_classes=3)
    m.update(logits[:2], labels[:2])
    m.update(logits[2:], labels[2:])
    assert m.compute()["top1"] == pytest.approx(0.5)
    # Always predicting class 0 on labels 0, 0, 0, 1: 3 of 4 right -> 0.75
    # (a per-class macro mean would give (1 + 0) / 2 = 0.5 instead).
    m.reset()
    m.update(torch.tensor([[1.0, 0, 0]] * 4), torch.tensor([0, 0, 0, 1]))
    r = m.compute()
    assert r["top1"] == pytest.approx(0.75) and isinstance(r["top1"], float)


# --------------------------------------------------------------------------- no data

@pytest.mark.parametrize("make", [SegmentationMetric, DetectionMetric, ClassificationMetric])
def test_compute_before_update_raises(make):
    with pytest.raises(ValueError, match="before any update"):
        make().compute()


def test_compute_after_reset_raises():
    m = ClassificationMetric(3)
    m.update(torch.eye(3), torch.arange(3))
    m.reset()
    with pytest.raises(ValueError):
        m.compute()


def test_det_without_any_ground_truth_raises():
    m = DetectionMetric()
    m.update([P([A], [0.9], [0])], [T([], [])])
    with pytest.raises(ValueError, match="undefined"):
        m.compute()


# ----------------------------------------------------------------------------- bootstrap intervals
def test_bootstrap_of_identical_images_collapses_to_the_score():
    from metrics import bootstrap_interval, score_images

    mask = torch.tensor([[0, 1], [1, 2]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1], [2, 2]], dtype=torch.uint8)
    items = [(pred, mask)] * 5
    score = score_images("seg", items)["mIoU"]
    assert bootstrap_interval("seg", items, 50) == pytest.approx([score, score])


def test_seg_bootstrap_matches_rescoring_each_resample():
    """The fast path (summed per-image confusion matrices) gives what scoring the masks gives."""
    import numpy as np

    from metrics import bootstrap_interval, score_images

    torch.manual_seed(0)
    items = [(torch.randint(0, 4, (6, 6), dtype=torch.uint8), torch.randint(0, 4, (6, 6), dtype=torch.uint8))
             for _ in range(8)]
    generator, values = torch.Generator().manual_seed(3), []
    for _ in range(40):
        picks = torch.randint(len(items), (len(items),), generator=generator).tolist()
        values.append(score_images("seg", [items[i] for i in picks])["mIoU"])
    assert bootstrap_interval("seg", items, 40, seed=3) == pytest.approx(list(np.percentile(values, [2.5, 97.5])))


def test_cls_bootstrap_interval_brackets_a_noisy_accuracy():
    from metrics import bootstrap_interval

    logits = torch.zeros(1, 10)
    logits[0, 1] = 1.0
    items = [(logits, torch.tensor([k % 2])) for k in range(40)]  # half of them right
    low, high = bootstrap_interval("cls", items, 300)
    assert 0.25 < low < 0.5 < high < 0.75


# ----------------------------------------------------------------------------- evaluate() maps boxes back
class OneImage(torch.utils.data.Dataset):
    """One 128 px input of a 512 x 256 original, one box."""
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.zeros(3, 128, 128, dtype=torch.uint8), {"boxes": torch.zeros(0, 4)}, i

    def original_size(self, i):
        return 256, 512

    def eval_target(self, i):
        return {"boxes": torch.tensor([[64.0, 64.0, 320.0, 192.0]]), "labels": torch.tensor([2]),
                "iscrowd": torch.tensor([0])}


class PerfectDetector(torch.nn.Module):
    def prepare_input(self, images):
        return images.float()

    def forward(self, x):   # the box [16, 32, 80, 96] at input size = the target in original pixels
        return {"det": cell_map({2 * GRID + 2: ([16.0, 32.0, 80.0, 96.0], 8.0, {2: 8.0})})}


def test_evaluate_scores_detection_in_original_pixels():
    assert evaluate(PerfectDetector(), OneImage(), "det")["mAP_50"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- evaluate() upsamples seg logits bilinearly
class OneMask(torch.utils.data.Dataset):
    """One image whose ground-truth mask (4 x 8) is larger than the model's coarse 1 x 2 logits."""
    MASK = torch.tensor([[1, 1, 1, 1, 1, 2, 2, 2]] * 4, dtype=torch.uint8)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32, dtype=torch.uint8), self.MASK, i

    def eval_target(self, i):
        return self.MASK


class TwoCellSegmenter(torch.nn.Module):
    """Coarse logits over 1 x 2 cells: class 1 scores 3 then 0, class 2 scores 0 then 1, the rest -10."""
    def prepare_input(self, images):
        return images.float()

    def forward(self, x):
        logits = torch.full((len(x), 21, 1, 2), -10.0)
        logits[:, 1, 0] = torch.tensor([3.0, 0.0])
        logits[:, 2, 0] = torch.tensor([0.0, 1.0])
        return {"seg_coarse": logits}


def test_seg_logits_upsampled_bilinearly_to_the_mask():
    # Width 2 -> 8 with align_corners=False: output column j samples the coarse row at
    # s = (j + 0.5) / 4 - 0.5, clamped to [0, 1], where class 1 scores 3 (1 - s) and class 2
    # scores s: class 1 wins while s < 3/4, i.e. columns 0..4 (column 4: s = 0.625, 1.125 > 0.625),
    # class 2 in columns 5..7. That is OneMask, so mIoU = 1.
    # Nearest copies each coarse cell to 4 columns: column 4 turns to class 2, and
    # class 1: TP 4 / (GT 5 + pred 4 - 4) = 4/5, class 2: TP 3 / (3 + 4 - 3) = 3/4 -> mIoU 0.775.
    from metrics import seg_logits_at

    scores = evaluate(TwoCellSegmenter(), OneMask(), "seg")
    assert scores["IoU_per_class"][:3] == [None, 1.0, 1.0] and scores["mIoU"] == 1.0
    # visualize.py draws its predicted masks with the same helper.
    upsampled = seg_logits_at(TwoCellSegmenter()(torch.zeros(1, 3, 32, 32))["seg_coarse"], (4, 8))
    assert torch.equal(upsampled[0].argmax(0), OneMask.MASK.long())
