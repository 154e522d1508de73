"""The three datasets (DL_data layout), joint image+target transforms, and loaders.

    seg  mini_voc_seg     VOC palette masks: 0 background, 1..20 classes, 255 void
    det  mini_coco_det    COCO json; sparse category ids mapped through `categories`
    cls  imagenette-160   ImageFolder, 10 classes

Every image is decoded and resized to `img_size` x `img_size` once, when the dataset is
built, and kept in memory as uint8 (900 small images: train and val of three tasks); augmentation then works on tensors
(transforms.v2 with tv_tensors, so a flip moves boxes and masks with the image).
`cache=False` decodes every image again on every access: the straightforward way, kept
for the speed benchmark. Images leave here as uint8; the model converts and normalises
them with its own backbone's mean/std (see models.py).

For evaluation each dataset also keeps the ground truth at the original resolution
(`eval_target(i)`): masks for mIoU, boxes in original pixels for mAP.

    python datasets.py --data_root DL_data          # counts per task and split
    python datasets.py --make-demo DEMO_DIR         # writes the tiny demo dataset
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from tasks import TASKS
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
VOID = 255
IMAGENETTE_NAMES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                    "n03888257": "parachute"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataError(ValueError):
    """Bad input data; the message names the file and what was expected."""


def require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: missing, expected {what}")
    return path


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB, or a DataError naming the file."""
    require(path, "an image file")
    try:
        with Image.open(path) as img:
            return TF.pil_to_tensor(img.convert("RGB"))
    except Exception as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def read_mask(path: Path, image_hw) -> torch.Tensor:
    """(H, W) uint8 class indices of a VOC palette PNG (its raw palette indices, not colours)."""
    require(path, "a VOC palette mask PNG")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DataError(f"{path}: mask mode {img.mode}, expected a palette ('P') PNG of class indices")
            mask = torch.from_numpy(np.array(img, dtype=np.uint8))
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: unreadable mask ({err})") from None
    if tuple(mask.shape) != tuple(image_hw):
        raise DataError(f"{path}: mask size {tuple(mask.shape)} differs from its image size {tuple(image_hw)}")
    bad = mask[(mask > 20) & (mask != VOID)]
    if bad.numel():
        raise DataError(f"{path}: mask value {int(bad[0])}, expected 0..20 or 255")
    return mask


# Drops the boxes left under 2 px (pushed out of the image or cut by a window) together with
# their labels and crowd flags; samples are (image, {"boxes", "labels", "iscrowd"}).
drop_lost_boxes = v2.SanitizeBoundingBoxes(min_size=2, labels_getter=lambda sample: (sample[1]["labels"],
                                                                                   sample[1]["iscrowd"]))


def train_augmentation(task=None, color_jitter=True, scale_jitter=None):
    """Horizontal flip and colour jitter; with `scale_jitter` = (min, max) also a random zoom in
    or out with a small shift, the image size unchanged. Boxes and masks move with the image
    (masks are padded with void); for detection, boxes pushed out of the image are dropped
    together with their labels and crowd flags."""
    ops = [v2.RandomHorizontalFlip(0.5)]
    if scale_jitter is not None:
        # The image is resampled nearest-neighbour (RandomAffine's default; masks always are):
        # bilinear gave detection no gain in stage 2 over three paired seeds (RESULTS.md, session 44).
        ops.append(v2.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=tuple(scale_jitter),
                                   fill={tv_tensors.Mask: VOID, "others": 0}))
        if task == "det":
            ops.append(drop_lost_boxes)
    if color_jitter:
        ops.append(v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02))
    return v2.Compose(ops)


def mosaic(samples, top, left):
    """YOLO-style mosaic of four detection samples (image (3, S, S), target) that already had
    their own augmentation: tiled 2 x 2 on a 2S x 2S canvas (the first at the top left), of
    which the S x S window with its top-left corner at (top, left) is cut out. Boxes move with
    their images; boxes the window cuts are clipped to it, and those left under 2 px dropped
    with their labels and crowd flags. Objects keep their size: one image shows parts of four
    scenes and more objects, the YOLO remedy for overfitting a small training set (in stage 2
    here, where the detector underfits, it gave no gain; in detection trained alone for 60
    epochs it was behind for 30 and ahead after 40: RESULTS.md, sessions 38-39)."""
    size = samples[0][0].shape[-1]
    canvas = torch.zeros(3, 2 * size, 2 * size, dtype=torch.uint8)
    boxes = []
    for k, (image, target) in enumerate(samples):
        y, x = (k // 2) * size, (k % 2) * size
        canvas[:, y:y + size, x:x + size] = image
        boxes.append(target["boxes"].as_subclass(torch.Tensor) + torch.tensor([x - left, y - top] * 2))
    boxes = tv_tensors.BoundingBoxes(torch.cat(boxes), format="XYXY", canvas_size=(size, size))
    target = {"boxes": TF.clamp_bounding_boxes(boxes),
              "labels": torch.cat([t["labels"] for _, t in samples]),
              "iscrowd": torch.cat([t["iscrowd"] for _, t in samples])}
    return drop_lost_boxes(canvas[:, top:top + size, left:left + size].clone(), target)


def classification_batch_mixing(mixup_alpha, cutmix_alpha, num_classes):
    """MixUp and / or CutMix on a whole classification batch (images, integer labels) -> (mixed
    images, soft labels (N, num_classes)); each batch gets one of the two when both are on.
    None when both alphas are 0. Applied to the [0, 1] float batch from prepare_input; the
    model's normalisation is affine, so mixing before it equals mixing after it."""
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha)) if alpha > 0]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


class TaskDataset(Dataset):
    """Shared machinery: decode + resize once (or per access), optional augmentation.

    A subclass lists its samples in `__init__` and implements `load(i)`, which returns the
    original-size image and its training target; `resize_target` brings that target to
    img_size and `eval_target(i)` returns the original-resolution ground truth."""

    task = None

    def __init__(self, img_size, train, cache=True, augment=None):
        # augment: the transform applied at every access; None gives train_augmentation's default
        # to training sets (`train`) and nothing to the others
        self.img_size = img_size
        self.augment = augment if augment is not None else (train_augmentation(self.task) if train else None)
        self.cache = cache
        self._resized = None
        self._masks = None

    def build_cache(self):
        if self.cache:
            self._resized = [self.resized(i) for i in range(len(self))]

    def resized(self, i):
        image, target = self.load(i)
        image = TF.resize(image, [self.img_size] * 2, antialias=True)
        return image, self.resize_target(target)

    def __getitem__(self, i):
        image, target = self._resized[i] if self._resized is not None else self.resized(i)
        if self.augment is not None:
            image, target = self.augment(tv_tensors.Image(image), target)
            image = image.as_subclass(torch.Tensor)
        return image, target, i

    def images_uint8(self):
        """All resized images as one (N, 3, S, S) uint8 tensor (for replay banks)."""
        return torch.stack([(self._resized[i] if self._resized else self.resized(i))[0] for i in range(len(self))])


# ----------------------------------------------------------------------------- segmentation
class VOCSegmentation(TaskDataset):
    task = "seg"
    class_names = list(VOC_CLASSES)

    def __init__(self, root, split, img_size=224, train=None, cache=True, augment=None):
        super().__init__(img_size, split == "train" if train is None else train, cache, augment)
        self.root = Path(root) / "mini_voc_seg"
        split_file = require(self.root / "ImageSets" / "Segmentation" / f"{split}.txt",
                             "a split file with one image id per line")
        self.ids = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if not self.ids:
            raise DataError(f"{split_file}: no image ids, expected one id per line")
        for image_id in self.ids:  # fail before any decoding, naming the first missing file
            require(self.root / "JPEGImages" / f"{image_id}.jpg", "a JPEG image listed in the split file")
            require(self.root / "SegmentationClass" / f"{image_id}.png", "a VOC palette mask PNG")
        self.build_cache()

    def __len__(self):
        return len(self.ids)

    def load(self, i):
        image = read_image(self.root / "JPEGImages" / f"{self.ids[i]}.jpg")
        return image, read_mask(self.root / "SegmentationClass" / f"{self.ids[i]}.png", image.shape[-2:])

    def resize_target(self, mask):
        mask = TF.resize(mask[None], [self.img_size] * 2, interpolation=v2.InterpolationMode.NEAREST)[0]
        return tv_tensors.Mask(mask)

    def eval_target(self, i):
        """The original-size mask (decoded once, then kept: validation runs every epoch)."""
        if self._masks is None:
            self._masks = {}
        if i not in self._masks:
            self._masks[i] = self.load(i)[1]
        return self._masks[i]


# ----------------------------------------------------------------------------- detection
class COCODetection(TaskDataset):
    """`mosaic` = p: each sample is, with probability p, a mosaic (see `mosaic`) of itself and
    three random training images, each augmented on its own first; 0 (the default) leaves the
    samples and the random stream exactly as without it."""
    task = "det"

    def __init__(self, root, split, img_size=224, train=None, cache=True, augment=None, mosaic=0.0):
        super().__init__(img_size, split == "train" if train is None else train, cache, augment)
        self.mosaic = mosaic
        self.root = Path(root) / "mini_coco_det"
        self.image_dir = require(self.root / "images" / split, "a folder of COCO images")
        ann_file = require(self.root / "annotations" / f"instances_{split}.json", "a COCO instances json")
        try:
            coco = json.loads(ann_file.read_text())
            categories = sorted(coco["categories"], key=lambda c: c["id"])
            images, annotations = coco["images"], coco["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{ann_file}: not a COCO instances json ({type(err).__name__}: {err})") from None
        for kind, entries, keys in (("image", images, ("id", "file_name", "height", "width")),
                                    ("annotation", annotations, ("image_id", "category_id", "bbox", "area"))):
            for entry in entries:
                missing = [k for k in keys if k not in entry]
                if missing:
                    raise DataError(f"{ann_file}: {kind} {entry.get('id', '?')} lacks {', '.join(missing)}")
        # Sparse COCO ids (1, 3, 16, ...) -> contiguous 0..C-1, in the order of the sorted ids.
        self.cat_id_to_label = {c["id"]: k for k, c in enumerate(categories)}
        self.class_names = [c["name"] for c in categories]
        self.images = images
        self.anns = {img["id"]: [] for img in images}
        for ann in annotations:
            if ann.get("category_id") not in self.cat_id_to_label:
                raise DataError(f"{ann_file}: annotation {ann.get('id')} has unknown category_id "
                                f"{ann.get('category_id')}, expected one of {sorted(self.cat_id_to_label)}")
            if ann.get("image_id") not in self.anns:
                raise DataError(f"{ann_file}: annotation {ann.get('id')} refers to unknown image_id "
                                f"{ann.get('image_id')}")
            self.anns[ann["image_id"]].append(ann)
        for img in images:
            require(self.image_dir / img["file_name"], f"the image listed in {ann_file.name}")
        self.build_cache()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if self.mosaic == 0 or torch.rand(()) >= self.mosaic:
            return super().__getitem__(i)
        partners = torch.randint(len(self), (3,)).tolist()
        samples = [TaskDataset.__getitem__(self, j)[:2] for j in (i, *partners)]
        # the window keeps at least a quarter of each image's width and height
        top, left = torch.randint(self.img_size // 4, 3 * self.img_size // 4 + 1, (2,)).tolist()
        image, target = mosaic(samples, top, left)
        return image, target, i

    def boxes_of(self, i):
        """Original-pixel xyxy boxes, contiguous labels and crowd flags of image i (for training;
        eval_target adds COCO's areas)."""
        anns = self.anns[self.images[i]["id"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        iscrowd = torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64)
        return boxes, labels, iscrowd

    def load(self, i):
        info = self.images[i]
        image = read_image(self.image_dir / info["file_name"])
        if (image.shape[1], image.shape[2]) != (info["height"], info["width"]):
            raise DataError(f"{self.image_dir / info['file_name']}: size {tuple(image.shape[1:])} differs from "
                            f"the json's height/width ({info['height']}, {info['width']})")
        boxes, labels, iscrowd = self.boxes_of(i)
        boxes = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
        return image, {"boxes": boxes, "labels": labels, "iscrowd": iscrowd}

    def resize_target(self, target):
        boxes = TF.resize(target["boxes"], [self.img_size] * 2)
        return {**target, "boxes": boxes}

    def eval_target(self, i):
        # COCO sorts objects into small / medium / large by the json's "area" (the object's
        # mask area), not by its box: pass it on so the size ranges match COCOeval's.
        boxes, labels, iscrowd = self.boxes_of(i)
        area = torch.tensor([a["area"] for a in self.anns[self.images[i]["id"]]], dtype=torch.float32)
        return {"boxes": boxes, "labels": labels, "iscrowd": iscrowd, "area": area}

    def original_size(self, i):
        return self.images[i]["height"], self.images[i]["width"]


# ----------------------------------------------------------------------------- classification
class ImagenetteClassification(TaskDataset):
    task = "cls"

    def __init__(self, root, split, img_size=224, train=None, cache=True, augment=None):
        super().__init__(img_size, split == "train" if train is None else train, cache, augment)
        self.root = require(Path(root) / "imagenette-160" / split, "an ImageFolder split (<wnid>/*.JPEG)")
        self.wnids = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.wnids:
            raise DataError(f"{self.root}: no class folders, expected one folder per wnid")
        self.class_names = [IMAGENETTE_NAMES.get(w, w) for w in self.wnids]
        self.samples = [(p, label) for label, wnid in enumerate(self.wnids)
                        for p in sorted((self.root / wnid).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not self.samples:
            raise DataError(f"{self.root}: no images, expected <wnid>/*.JPEG")
        self.build_cache()

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        path, label = self.samples[i]
        return read_image(path), label

    def resize_target(self, label):
        return label

    def eval_target(self, i):
        return self.samples[i][1]


DATASETS = {"seg": VOCSegmentation, "det": COCODetection, "cls": ImagenetteClassification}


def build_dataset(task, root, split, img_size=224, **kwargs):
    return DATASETS[task](root, split, img_size=img_size, **kwargs)


def collate(batch):
    """Images stacked; masks stacked; labels as a tensor; detection targets kept as a list."""
    images, targets, indices = zip(*batch)
    first = targets[0]
    if isinstance(first, torch.Tensor):
        targets = torch.stack([t.as_subclass(torch.Tensor) for t in targets])
    elif isinstance(first, int):
        targets = torch.tensor(targets)
    else:
        targets = [{k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
                   for t in targets]
    return torch.stack(images), targets, torch.tensor(indices)


def make_loader(dataset, batch_size, shuffle, workers=0, pin_memory=False, drop_last=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=drop_last, generator=generator,
                      persistent_workers=workers > 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the DL_data layout, or write the demo dataset.")
    parser.add_argument("--data_root", default="DL_data")
    parser.add_argument("--img_size", type=int, default=64, help="resize used while checking (small = fast)")
    parser.add_argument("--make-demo", "--make_demo", dest="make_demo", metavar="DIR",
                        help="write the demo dataset (the one train.py --demo trains on) to DIR")
    args = parser.parse_args(argv)
    if args.make_demo:
        from demo_data import make_demo

        try:
            print(f"demo dataset written to {make_demo(args.make_demo)}")
        except FileExistsError as err:
            sys.exit(f"error: {err}")
        return
    try:
        for task in TASKS:
            for split in ("train", "val"):
                dataset = build_dataset(task, args.data_root, split, img_size=args.img_size)
                print(f"{task} {split} {len(dataset)}")
    except DataError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
