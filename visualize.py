"""Qualitative results: a few validation images per task, prediction next to ground truth.

    python eval.py ... --save_vis DIR   ->   DIR/seg_00.png, DIR/det_00.png, DIR/cls_00.png, ...

The model sees the same img_size input as in metrics.evaluate(), and everything is drawn
at the ORIGINAL image resolution against `dataset.eval_target(i)`, the ground truth the
metrics score against. Detection pictures show the boxes scoring at least 0.3; the metric
also ranks the lower-scored ones (detection.decode's 0.05 threshold, up to 100 per image).
"""
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from datasets import VOC_CLASSES, VOID  # noqa: E402
from demo_data import voc_palette  # noqa: E402
from detection import decode  # noqa: E402
from metrics import seg_logits_at  # noqa: E402

PALETTE = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)  # VOC's own colours; 255 (void) is off-white
# One colour per detection class: tab10 with its grey (class 7) made black, as grey vanishes on photos.
BOX_COLORS = [*plt.get_cmap("tab10").colors[:7], (0.0, 0.0, 0.0), *plt.get_cmap("tab10").colors[8:]]
OVERLAY_ALPHA = 0.5  # class colours over the photo: half-transparent, so the image shows through
MIN_PANEL_PX = 320  # small images (Imagenette-160, demo data) are enlarged so the text stays legible
DPI = 100


def pick_indices(n_total, num_images):
    """Evenly spread over the dataset: Imagenette is sorted by class, so the first few would share one."""
    return torch.linspace(0, n_total - 1, min(num_images, n_total)).round().long().tolist()


def new_figure(panels, height, width):
    """One row of panels; one image pixel is at least one output pixel (original resolution)."""
    scale = max(1.0, MIN_PANEL_PX / min(height, width))
    size = (panels * width * scale / DPI, height * scale / DPI + 0.5)  # + room for the titles
    fig, axes = plt.subplots(1, panels, figsize=size, dpi=DPI, squeeze=False, layout="constrained")
    for ax in axes[0]:
        ax.set_axis_off()
    return fig, list(axes[0])


def mask_overlay(mask, alpha=OVERLAY_ALPHA):
    """RGBA layer in VOC colours; background stays transparent so the image shows through."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[..., :3] = PALETTE[mask] / 255
    rgba[..., 3] = np.where(mask == 0, 0.0, alpha)
    return rgba


def legend_handles(classes, names):
    """One legend patch per class but background, filled with the RGBA the overlay draws it in (the
    colour a reader sees over the photo, not the full-strength one); a thin grey edge keeps the pale
    void colour visible on the white figure."""
    return [Patch(facecolor=tuple(mask_overlay(np.array([[c]]))[0, 0].tolist()), edgecolor="0.4", linewidth=0.5,
                  label="void" if c == VOID else names[c]) for c in classes if c != 0]


def draw_seg(image, pred, gt, names, path):
    fig, axes = new_figure(3, *gt.shape)
    for ax, mask, title in zip(axes, (None, pred, gt), ("image", "prediction", "ground truth")):
        ax.imshow(image)
        if mask is not None:
            ax.imshow(mask_overlay(mask), interpolation="nearest")  # nearest: no blended class colours
        ax.set_title(title)
    present = sorted(set(np.unique(pred).tolist()) | set(np.unique(gt).tolist()))
    handles = legend_handles(present, names)
    if handles:  # only the classes on this image, or a 21-entry legend would drown the picture
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.savefig(path)
    plt.close(fig)


def draw_boxes(ax, boxes, labels, texts, crowd=None):
    for k, ((x1, y1, x2, y2), label, text) in enumerate(zip(boxes.tolist(), labels.tolist(), texts)):
        color = BOX_COLORS[label % len(BOX_COLORS)]
        style = "--" if crowd is not None and crowd[k] else "-"  # crowd boxes are ignored by the metric
        halo = [patheffects.withStroke(linewidth=3.5, foreground="white")]  # visible on dark and grey images alike
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2, linestyle=style,
                               path_effects=halo))
        # Label inside the top-left corner, so boxes touching the top edge keep theirs.
        ax.text(x1, y1, text, color="white", fontsize=8, va="top", clip_on=True,
                bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"))


def draw_det(image, det, gt, names, score_threshold, path):
    fig, (ax_pred, ax_gt) = new_figure(2, *image.shape[:2])
    for ax in (ax_pred, ax_gt):
        ax.imshow(image)
    draw_boxes(ax_pred, det["boxes"], det["labels"],
               [f"{names[c]} {s:.2f}" for c, s in zip(det["labels"].tolist(), det["scores"].tolist())])
    ax_pred.set_title(f"prediction: {len(det['boxes'])} boxes, score >= {score_threshold}")
    draw_boxes(ax_gt, gt["boxes"], gt["labels"], [names[c] for c in gt["labels"].tolist()], gt["iscrowd"].tolist())
    ax_gt.set_title("ground truth (crowd dashed)")
    fig.savefig(path)
    plt.close(fig)


def draw_cls(image, pred, prob, label, names, path):
    fig, (ax,) = new_figure(1, *image.shape[:2])
    ax.imshow(image)
    # Two lines: one would not fit a 160 px Imagenette image with long names ("English springer").
    ax.set_title(f"pred: {names[pred]} (p={prob:.2f})\ntrue: {names[label]}",
                 color="green" if pred == label else "red", fontsize=10)
    fig.savefig(path)
    plt.close(fig)


def save_visualizations(model, dataset, task, out_dir, num_images=4, score_threshold=0.3):
    """Write `{task}_{k:02d}.png` for `num_images` images of `dataset` spread evenly; return the paths."""
    if task not in ("seg", "det", "cls"):
        raise ValueError(f"unknown task {task!r}; expected 'seg', 'det' or 'cls'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = VOC_CLASSES if task == "seg" else dataset.class_names
    indices = pick_indices(len(dataset), num_images)
    if not indices:
        return []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        images = torch.stack([dataset[i][0] for i in indices])
        outputs = {k: v.float().cpu() for k, v in model(model.prepare_input(images)).items()}
    model.train(was_training)  # a caller in the middle of training gets its model back as it was
    if task == "det":  # boxes come back in original pixels, like in metrics.evaluate()
        dets = decode(outputs["det"], [dataset.original_size(i) for i in indices], score_threshold=score_threshold)

    paths = []
    for k, i in enumerate(indices):
        image = dataset.load(i)[0].permute(1, 2, 0).numpy()  # original size, (H, W, 3) uint8
        gt, path = dataset.eval_target(i), out_dir / f"{task}_{k:02d}.png"
        if task == "seg":  # logits to the mask's own size, then argmax: as the metric does
            logits = seg_logits_at(outputs["seg_coarse"][k:k + 1], gt.shape)
            draw_seg(image, logits[0].argmax(0).numpy(), gt.numpy(), names, path)
        elif task == "det":
            draw_det(image, dets[k], gt, names, score_threshold, path)
        else:
            prob, pred = outputs["cls"][k].softmax(0).max(0)
            draw_cls(image, int(pred), float(prob), gt, names, path)
        paths.append(path)
    return paths
