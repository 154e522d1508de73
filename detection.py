"""Detection on the stride-16 grid: target assignment, loss and decoding.

Each cell predicts 5 + C values: (l, t, r, b) distances from the cell centre to the box
sides (log-space, in units of the stride), one objectness logit and C class logits.

Assignment ("region", FCOS / YOLOX style, the default): a cell is positive for a box when
its centre lies inside the box and within `center_radius` strides of the box centre; the
cell holding the box centre is always positive, so small boxes get one too. A cell claimed
by several boxes goes to the smallest. Cells inside crowd boxes that are not positives are
ignored (neither positive nor negative), as COCO ignores crowd regions.
Assignment "center" is the reference implementation's rule (only the cell holding the box
centre), kept for the ablation with everything else equal.

Loss: 5 x GIoU on decoded boxes of positives (`box_weight`, as YOLOX weights its IoU term),
BCE on objectness over every non-ignored cell, BCE on one-hot class targets of positives,
each normalised by the number of positives.
Objectness target of a positive: 1 ("binary", the default), or ("iou", as in YOLOv5) the IoU
of the box it predicts with its ground truth, so that the score ranks cells by how well they
localise and the poor boxes of off-centre cells lose to the good one in NMS.
Decoding: score = sigmoid(obj) * sigmoid(class), threshold, top-k, batched NMS, then
boxes scaled back to the original image size. Training-time validation and eval.py both
call `decode`.
"""
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, generalized_box_iou_loss

from models import DET_STRIDE

MAX_LOG_DISTANCE = 6.0  # exp(6) * 16 px is far beyond any image here; keeps exp finite


def cell_centers(height, width, stride=DET_STRIDE, device=None):
    """(H*W, 2) xy pixel centres of the grid cells, row-major like the flattened map."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], 1)


def decode_boxes(box_logits, centers, stride=DET_STRIDE):
    """box_logits (..., 4) log-distances -> (..., 4) xyxy pixels around each cell centre."""
    dist = torch.exp(box_logits.float().clamp(max=MAX_LOG_DISTANCE)) * stride
    return torch.cat([centers - dist[..., :2], centers + dist[..., 2:]], -1)


def assign_targets(boxes, iscrowd, centers, stride=DET_STRIDE, center_radius=2.5, mode="region"):
    """One image. boxes (M, 4) xyxy pixels at the model's input size.

    Returns per cell: `box_index` (-1 = negative, -2 = ignored, else index into boxes)."""
    num_cells = centers.shape[0]
    box_index = torch.full((num_cells,), -1, dtype=torch.int64, device=centers.device)
    if boxes.numel() == 0:
        return box_index
    x, y = centers[:, 0:1], centers[:, 1:2]                                   # (cells, 1)
    x1, y1, x2, y2 = boxes.T[:, None, :].unbind(0)                            # each (1, M)
    inside = (x > x1) & (x < x2) & (y > y1) & (y < y2)                        # (cells, M)
    box_cx, box_cy = (x1 + x2) / 2, (y1 + y2) / 2
    # The cell holding each box centre (clamped for boxes touching the border).
    grid_w = int(round(centers[:, 0].max().item() / stride + 0.5))
    col = (box_cx / stride).long().clamp(0, grid_w - 1)
    row = (box_cy / stride).long().clamp(0, num_cells // grid_w - 1)
    holds_center = torch.arange(num_cells, device=centers.device)[:, None] == (row * grid_w + col)
    if mode == "region":
        near_center = ((x - box_cx).abs() < center_radius * stride) & ((y - box_cy).abs() < center_radius * stride)
        candidate = (inside & near_center) | holds_center
    elif mode == "center":
        candidate = holds_center
    else:
        raise ValueError(f"unknown assignment {mode!r}; expected 'region' or 'center'")
    crowd = iscrowd.bool()[None, :]
    candidate = candidate & ~crowd
    area = ((x2 - x1) * (y2 - y1)).expand(num_cells, -1)
    area = torch.where(candidate, area, torch.full_like(area, float("inf")))
    smallest_area, smallest = area.min(1)
    positive = torch.isfinite(smallest_area)
    box_index[positive] = smallest[positive]
    in_crowd = (inside & crowd).any(1)
    box_index[~positive & in_crowd] = -2
    return box_index


def paired_iou(boxes1, boxes2):
    """IoU of boxes1[i] with boxes2[i] (both (P, 4) xyxy), not the P x P matrix of box_iou."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(1)
    return inter / (area1 + area2 - inter).clamp(min=1e-6)


def detection_loss(det_map, targets, center_radius=2.5, mode="region", objectness="binary", box_weight=5.0):
    """det_map (N, 5+C, H, W) raw outputs; targets: list of dicts with boxes (xyxy at input size),
    labels (contiguous), iscrowd. Returns (total, parts dict of detached tensors)."""
    if objectness not in ("iou", "binary"):
        raise ValueError(f"unknown objectness target {objectness!r}; expected 'iou' or 'binary'")
    n, channels, height, width = det_map.shape
    num_classes = channels - 5
    preds = det_map.float().permute(0, 2, 3, 1).reshape(n, height * width, channels)
    centers = cell_centers(height, width, device=det_map.device)

    obj_targets, obj_masks, pos_preds, pos_boxes, pos_labels, pos_centers = [], [], [], [], [], []
    for i, target in enumerate(targets):
        boxes = target["boxes"].to(det_map.device, torch.float32)
        labels = target["labels"].to(det_map.device)
        index = assign_targets(boxes, target["iscrowd"].to(det_map.device), centers,
                               center_radius=center_radius, mode=mode)
        positive = index >= 0
        obj_targets.append(positive.float())
        obj_masks.append(index != -2)
        pos_preds.append(preds[i, positive])
        pos_boxes.append(boxes[index[positive]])
        pos_labels.append(labels[index[positive]])
        pos_centers.append(centers[positive])

    obj_target, obj_mask = torch.stack(obj_targets), torch.stack(obj_masks)
    pos_pred, pos_box = torch.cat(pos_preds), torch.cat(pos_boxes)
    num_pos = max(pos_pred.shape[0], 1)

    if pos_pred.shape[0]:
        decoded = decode_boxes(pos_pred[:, :4], torch.cat(pos_centers))
        if objectness == "iou":  # positives in the same order as obj_target's True cells
            obj_target = obj_target.masked_scatter(obj_target.bool(), paired_iou(decoded.detach(), pos_box))
        box_loss = generalized_box_iou_loss(decoded, pos_box, reduction="sum") / num_pos
        class_target = F.one_hot(torch.cat(pos_labels), num_classes).float()
        cls_loss = F.binary_cross_entropy_with_logits(pos_pred[:, 5:], class_target, reduction="sum") / num_pos
    else:  # no objects in the batch: only objectness learns (zeros keep the graph intact)
        box_loss = cls_loss = preds[..., :4].sum() * 0.0
    obj_loss = F.binary_cross_entropy_with_logits(preds[..., 4], obj_target, reduction="none")
    obj_loss = (obj_loss * obj_mask).sum() / num_pos
    total = box_weight * box_loss + obj_loss + cls_loss
    parts = {"det_box": box_loss.detach(), "det_obj": obj_loss.detach(), "det_cls": cls_loss.detach()}
    return total, parts


@torch.no_grad()
def decode(det_map, original_sizes=None, score_threshold=0.05, pre_nms_topk=1000, nms_iou=0.6, max_detections=100):
    """det_map (N, 5+C, H, W) -> list of dicts(boxes xyxy, scores, labels) per image.

    Boxes are in the model's input pixels, or in original pixels when `original_sizes`
    [(h, w), ...] is given (the input is a plain resize of the original image)."""
    n, channels, height, width = det_map.shape
    num_classes = channels - 5
    preds = det_map.float().permute(0, 2, 3, 1).reshape(n, height * width, channels)
    centers = cell_centers(height, width, device=det_map.device)
    input_h, input_w = height * DET_STRIDE, width * DET_STRIDE
    results = []
    for i in range(n):
        scores = torch.sigmoid(preds[i, :, 4:5]) * torch.sigmoid(preds[i, :, 5:])   # (cells, C)
        scores = scores.reshape(-1)
        keep = scores > score_threshold
        candidates = keep.nonzero().squeeze(1)
        if candidates.numel() > pre_nms_topk:
            candidates = candidates[scores[candidates].topk(pre_nms_topk).indices]
        cells, labels = candidates // num_classes, candidates % num_classes
        boxes = decode_boxes(preds[i, cells, :4], centers[cells])
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, input_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, input_h)
        scores = scores[candidates]
        keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if original_sizes is not None:
            orig_h, orig_w = original_sizes[i]
            boxes = boxes * torch.tensor([orig_w / input_w, orig_h / input_h] * 2, device=boxes.device)
        results.append({"boxes": boxes, "scores": scores, "labels": labels})
    return results
