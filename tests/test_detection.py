"""Detection coding: assignment, loss and decoding on hand-made boxes."""
import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from detection import assign_targets, cell_centers, decode, decode_boxes, detection_loss, paired_iou

S = 128          # input size -> an 8 x 8 grid of stride-16 cells
GRID = S // 16
C = 10


def perfect_map(boxes, labels, iscrowd=None, mode="region"):
    """The det map a perfect model would output for these targets (logit +-8)."""
    iscrowd = torch.zeros(len(labels), dtype=torch.int64) if iscrowd is None else iscrowd
    centers = cell_centers(GRID, GRID)
    index = assign_targets(boxes, iscrowd, centers, mode=mode)
    det = torch.full((5 + C, GRID * GRID), -8.0)
    det[:4] = 0.0
    for cell in (index >= 0).nonzero().squeeze(1).tolist():
        box = boxes[index[cell]]
        cx, cy = centers[cell]
        ltrb = torch.stack([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / 16
        det[:4, cell] = torch.log(ltrb)
        det[4, cell] = 8.0
        det[5 + labels[index[cell]], cell] = 8.0
    return det.reshape(1, 5 + C, GRID, GRID), index


def cell_map(cells):
    """A (1, 5+C, 8, 8) det map with every logit -8 (box logits 0) but those of `cells`:
    {cell index: (xyxy box, objectness logit, {class: logit})}."""
    centers = cell_centers(GRID, GRID)
    det = torch.full((5 + C, GRID * GRID), -8.0)
    det[:4] = 0.0
    for cell, (box, obj, classes) in cells.items():
        cx, cy = centers[cell]
        det[:4, cell] = torch.log(torch.stack([cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]) / 16)
        det[4, cell] = obj
        for c, logit in classes.items():
            det[5 + c, cell] = logit
    return det.reshape(1, 5 + C, GRID, GRID)


def test_encode_then_decode_gives_the_boxes_back():
    boxes = torch.tensor([[10.0, 20.0, 60.0, 90.0], [70.0, 8.0, 120.0, 40.0], [30.0, 100.0, 41.0, 111.0]])
    labels = torch.tensor([0, 4, 9])
    det, _ = perfect_map(boxes, labels)
    result = decode(det)[0]
    assert len(result["boxes"]) == 3, "one detection per object after NMS"
    iou = box_iou(result["boxes"], boxes)
    best, match = iou.max(1)
    assert (best > 0.9).all()
    assert torch.equal(result["labels"], labels[match])


def test_decode_maps_boxes_back_to_original_pixels():
    boxes = torch.tensor([[16.0, 32.0, 80.0, 96.0]])
    det, _ = perfect_map(boxes, torch.tensor([2]))
    result = decode(det, original_sizes=[(256, 512)])[0]   # original is 512 wide, 256 high
    expected = torch.tensor([[64.0, 64.0, 320.0, 192.0]])
    assert box_iou(result["boxes"], expected).max() > 0.99


def test_region_assignment_gives_an_object_several_cells_and_the_smaller_box_wins():
    centers = cell_centers(GRID, GRID)
    big = torch.tensor([0.0, 0.0, 128.0, 128.0])
    small = torch.tensor([30.0, 30.0, 70.0, 70.0])
    index = assign_targets(torch.stack([big, small]), torch.tensor([0, 0]), centers)
    assert (index == 0).sum() > 1, "the big box gets several positive cells"
    # Cells whose centres lie in the small box belong to it, not to the big box around it.
    in_small = ((centers > 30) & (centers < 70)).all(1)
    assert (index[in_small] == 1).all() and in_small.sum() == 4
    center_only = assign_targets(torch.stack([big, small]), torch.tensor([0, 0]), centers,
                                 mode="center")
    assert (center_only >= 0).sum() <= 2, "the reference rule: one cell per object"


def test_a_tiny_box_still_gets_its_centre_cell():
    centers = cell_centers(GRID, GRID)
    index = assign_targets(torch.tensor([[50.0, 50.0, 54.0, 53.0]]), torch.tensor([0]), centers)
    assert (index == 0).sum() == 1
    assert (index == 0).nonzero().item() == 3 * GRID + 3   # the cell holding (52, 51.5)


def test_crowd_boxes_are_neither_positive_nor_negative():
    centers = cell_centers(GRID, GRID)
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [64.0, 64.0, 128.0, 128.0]])
    index = assign_targets(boxes, torch.tensor([0, 1]), centers)
    in_crowd = ((centers > 64) & (centers < 128)).all(1)
    assert (index[in_crowd] == -2).all(), "cells inside the crowd box are ignored"
    assert (index == 1).sum() == 0, "a crowd box is never a target"
    assert (index == 0).sum() > 0
    # The objectness loss does not change when the ignored cells' predictions change.
    det, _ = perfect_map(boxes[:1], torch.tensor([0]))
    target = [{"boxes": boxes, "labels": torch.tensor([0, 0]), "iscrowd": torch.tensor([0, 1])}]
    loss_a, _ = detection_loss(det, target)
    det_b = det.clone().reshape(1, 5 + C, -1)
    det_b[0, 4, in_crowd] = 5.0   # confident "object" inside the crowd region
    loss_b, _ = detection_loss(det_b.reshape(det.shape), target)
    assert torch.allclose(loss_a, loss_b)


def test_several_objects_and_an_empty_image_in_one_batch():
    det = torch.randn(2, 5 + C, GRID, GRID)
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 50.0, 50.0], [60.0, 60.0, 120.0, 100.0]]),
                "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "iscrowd": torch.zeros(0, dtype=torch.int64)}]
    loss, parts = detection_loss(det, targets)
    assert math.isfinite(loss.item()) and parts["det_box"] > 0
    empty_loss, empty_parts = detection_loss(det[1:], targets[1:])
    assert math.isfinite(empty_loss.item()) and empty_parts["det_box"] == 0


def test_perfect_predictions_have_low_loss_and_decode_boxes_round_trip():
    boxes = torch.tensor([[8.0, 8.0, 56.0, 72.0]])
    det, index = perfect_map(boxes, torch.tensor([5]))
    loss, parts = detection_loss(det, [{"boxes": boxes, "labels": torch.tensor([5]), "iscrowd": torch.tensor([0])}])
    assert parts["det_box"] < 1e-4 and parts["det_obj"] < 0.05 and parts["det_cls"] < 0.05
    positive = (index >= 0).nonzero().squeeze(1)
    decoded = decode_boxes(det.reshape(5 + C, -1)[:4, positive].T, cell_centers(GRID, GRID)[positive])
    assert torch.allclose(decoded, boxes.expand_as(decoded), atol=1e-3)


def test_loss_falls_steadily_when_fitting_one_image():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 5 + C, 1))
    features = torch.randn(1, 8, GRID, GRID)
    target = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [80.0, 60.0, 120.0, 124.0]]),
               "labels": torch.tensor([0, 7]), "iscrowd": torch.tensor([0, 0])}]
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = detection_loss(head(features), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    windows = [sum(losses[i:i + 10]) / 10 for i in range(0, 60, 10)]
    assert all(b < a for a, b in zip(windows, windows[1:])), f"loss did not fall steadily: {windows}"
    result = decode(head(features))[0]
    assert box_iou(result["boxes"][:2], target[0]["boxes"]).max(0).values.min() > 0.5


def test_paired_iou_is_the_diagonal_of_box_iou():
    torch.manual_seed(0)
    points = torch.rand(2, 6, 2, 2) * 100                      # two random corners per box
    boxes1, boxes2 = torch.cat([points.min(2).values, points.max(2).values], 2)
    disjoint = torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[20.0, 20.0, 30.0, 30.0]])
    for a, b in ((boxes1, boxes2), disjoint):
        assert torch.allclose(paired_iou(a, b), box_iou(a, b).diag(), atol=1e-6)


def test_iou_objectness_targets_each_positive_with_the_iou_of_its_box():
    boxes = torch.tensor([[8.0, 8.0, 56.0, 72.0]])
    target = [{"boxes": boxes, "labels": torch.tensor([5]), "iscrowd": torch.tensor([0])}]
    det, index = perfect_map(boxes, torch.tensor([5]))
    positive = (index >= 0).nonzero().squeeze(1)
    det = det.reshape(5 + C, -1)
    det[2:4, positive] += math.log(1.5)     # every positive's box 1.5x too far right and down
    iou = paired_iou(decode_boxes(det[:4, positive].T, cell_centers(GRID, GRID)[positive]), boxes.expand(len(positive), 4))
    assert (iou > 0.2).all() and (iou < 0.9).all()
    det[4, positive] = torch.logit(iou)     # objectness already equal to each box's IoU
    det = det.reshape(1, 5 + C, GRID, GRID).requires_grad_(True)
    for objectness, at_minimum in (("iou", True), ("binary", False)):
        det.grad = None
        loss, _ = detection_loss(det, target, objectness=objectness)
        loss.backward()
        obj_grad = det.grad.reshape(5 + C, -1)[4, positive]
        assert torch.allclose(obj_grad, torch.zeros_like(obj_grad), atol=1e-6) == at_minimum, objectness


# ----------------------------------------------------------------------------- rules no test held before a mutation run (session 43)
def test_smaller_box_by_true_area_wins_for_boxes_with_x1_ne_y1():
    # A: 128 x 32 = 4096 px, B: 48 x 128 = 6144 px; both claim the cell at (56, 72)
    boxes = torch.tensor([[0.0, 64.0, 128.0, 96.0], [40.0, 0.0, 88.0, 128.0]])
    index = assign_targets(boxes, torch.tensor([0, 0]), cell_centers(GRID, GRID))
    assert index[4 * GRID + 3] == 0


def test_a_box_inside_a_crowd_region_keeps_its_positives():
    boxes = torch.tensor([[16.0, 16.0, 48.0, 48.0], [0.0, 0.0, 128.0, 128.0]])
    index = assign_targets(boxes, torch.tensor([0, 1]), cell_centers(GRID, GRID))
    assert index[2 * GRID + 2] == 0          # the cell holding the box centre (32, 32)
    assert index[6 * GRID + 6] == -2         # a crowd cell far from the box: ignored


def test_decoded_score_is_objectness_times_class():
    det = cell_map({27: ([40.0, 40.0, 72.0, 72.0], 0.0, {3: 0.0}),      # 0.5 x 0.5
                    45: ([72.0, 72.0, 104.0, 104.0], -8.0, {5: 8.0})})  # no object, confident class
    result = decode(det)[0]
    assert result["labels"].tolist() == [3]
    assert result["scores"].tolist() == pytest.approx([0.25], abs=1e-4)


def test_nms_is_per_class():
    box = [40.0, 40.0, 88.0, 72.0]
    two_classes = decode(cell_map({27: (box, 8.0, {1: 8.0}), 28: (box, 8.0, {2: 8.0})}))[0]
    assert sorted(two_classes["labels"].tolist()) == [1, 2]
    one_class = decode(cell_map({27: (box, 8.0, {1: 8.0}), 28: (box, 8.0, {1: 8.0})}))[0]
    assert one_class["labels"].tolist() == [1]


def test_pre_nms_topk_keeps_the_highest_scores():
    det = cell_map({0: ([0.0, 0.0, 16.0, 16.0], 1.0, {0: 8.0}), 63: ([112.0, 112.0, 128.0, 128.0], 4.0, {0: 8.0})})
    result = decode(det, pre_nms_topk=1)[0]
    assert result["boxes"].tolist() == [pytest.approx([112.0, 112.0, 128.0, 128.0], abs=1e-3)]


def test_loss_total_and_box_term_by_hand():
    torch.manual_seed(0)
    det = torch.randn(1, 5 + C, GRID, GRID)
    boxes = torch.tensor([[10.0, 12.0, 70.0, 80.0], [80.0, 60.0, 120.0, 124.0]])
    target = [{"boxes": boxes, "labels": torch.tensor([0, 7]), "iscrowd": torch.tensor([0, 0])}]
    total, parts = detection_loss(det, target)
    assert total.item() == pytest.approx((5 * parts["det_box"] + parts["det_obj"] + parts["det_cls"]).item(), rel=1e-5)
    centers = cell_centers(GRID, GRID)
    index = assign_targets(boxes, torch.tensor([0, 0]), centers)
    pos = (index >= 0).nonzero().squeeze(1)
    decoded = decode_boxes(det.reshape(5 + C, -1)[:4, pos].T, centers[pos])
    expected = (1 - generalized_box_iou(decoded, boxes[index[pos]]).diag()).mean()
    assert parts["det_box"].item() == pytest.approx(expected.item(), rel=1e-5)
