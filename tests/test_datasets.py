"""datasets.py on the tiny demo data (img_size 64): samples, loaders, COCO id mapping, crowd
boxes, flip consistency, cache equivalence, a DataError naming the file for every bad input,
the command line; plus a smoke test on the real ../shared/DL_data when it is there."""
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import datasets
import demo_data
from datasets import DataError, build_dataset, collate, make_loader

REPO = Path(__file__).resolve().parents[1]
S = 64  # img_size used on the demo data
# conftest's demo_root has n_train=8, n_val=4. Per split: cls max(n, 10) round-robin over the classes, seg/det max(n, 2).
DEMO_COUNTS = {("seg", "train"): 8, ("seg", "val"): 4, ("det", "train"): 8, ("det", "val"): 4,
               ("cls", "train"): 10, ("cls", "val"): 10}
SPARSE_IDS = [c for c, _ in demo_data.COCO_CATS]  # 1, 3, 16, 31, 44, 47, 51, 62, 63, 67


def plain(dataset_cls_or_task, root, split="train", **kw):
    """A dataset without augmentation (train=False), so samples are deterministic."""
    return build_dataset(dataset_cls_or_task, root, split, img_size=S, train=False, **kw)


def coco_json(root, split="train"):
    return root / "mini_coco_det" / "annotations" / f"instances_{split}.json"


def voc_ids(root, split="train"):
    return (root / "mini_voc_seg" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def check_image(image):
    assert type(image) is torch.Tensor  # a plain tensor, not a tv_tensors subclass
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, S, S)


# ----------------------------------------------------------------------------- samples
@pytest.mark.parametrize("split", ["train", "val"])
def test_seg_samples(demo_root, split):
    ds = build_dataset("seg", demo_root, split, img_size=S)
    assert len(ds) == DEMO_COUNTS["seg", split]
    assert (ds.augment is not None) == (split == "train")  # training images are augmented by default
    for i in range(len(ds)):
        image, mask, index = ds[i]
        assert index == i
        check_image(image)
        assert mask.dtype == torch.uint8 and tuple(mask.shape) == (S, S)
        values = set(mask.unique().tolist())
        assert values <= set(range(21)) | {255}
        assert 0 in values and values - {0, 255}  # background and at least one object
        assert ds.eval_target(i).shape[-2:] != (S, S)  # original resolution kept for the metric


@pytest.mark.parametrize("split", ["train", "val"])
def test_det_samples(demo_root, split):
    ds = build_dataset("det", demo_root, split, img_size=S)
    assert len(ds) == DEMO_COUNTS["det", split]
    assert ds.class_names == [name for _, name in demo_data.COCO_CATS]
    n_boxes = 0
    for i in range(len(ds)):
        image, target, _ = ds[i]
        check_image(image)
        boxes, labels, iscrowd = target["boxes"], target["labels"], target["iscrowd"]
        k = len(labels)
        n_boxes += k
        assert boxes.dtype == torch.float32 and tuple(boxes.shape) == (k, 4)
        assert labels.dtype == torch.int64 and iscrowd.dtype == torch.int64 and len(iscrowd) == k
        assert ((labels >= 0) & (labels <= 9)).all()
        assert set(iscrowd.tolist()) <= {0, 1}
        if k:
            assert (boxes >= 0).all() and (boxes <= S).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ds[0][1]["boxes"].shape == (0, 4)  # demo image 0 of each split has no object
    assert n_boxes > 0


@pytest.mark.parametrize("split", ["train", "val"])
def test_cls_samples(demo_root, split):
    ds = build_dataset("cls", demo_root, split, img_size=S)
    assert len(ds) == DEMO_COUNTS["cls", split]
    assert ds.wnids == demo_data.WNIDS
    labels = []
    for i in range(len(ds)):
        image, label, _ = ds[i]
        check_image(image)
        assert isinstance(label, int) and 0 <= label <= 9
        labels.append(label)
    assert sorted(labels) == list(range(10))  # one per class in the demo


def test_resize_is_to_img_size(demo_root):
    for task in datasets.TASKS:
        image, _, _ = build_dataset(task, demo_root, "val", img_size=48, train=False)[1]
        assert tuple(image.shape) == (3, 48, 48)


# ----------------------------------------------------------------------------- loaders
def test_collate_and_make_loader(demo_root):
    batch = 3
    seg = make_loader(build_dataset("seg", demo_root, "train", img_size=S), batch, shuffle=True)
    images, masks, idx = next(iter(seg))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (batch, 3, S, S)
    assert type(masks) is torch.Tensor and masks.dtype == torch.uint8 and tuple(masks.shape) == (batch, S, S)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (batch,)

    det = make_loader(build_dataset("det", demo_root, "train", img_size=S), batch, shuffle=False)
    images, targets, idx = next(iter(det))
    assert tuple(images.shape) == (batch, 3, S, S) and idx.tolist() == [0, 1, 2]
    assert isinstance(targets, list) and len(targets) == batch
    for t in targets:
        assert set(t) == {"boxes", "labels", "iscrowd"}
        assert all(type(v) is torch.Tensor for v in t.values())  # tv_tensors unwrapped
        assert t["boxes"].shape == (len(t["labels"]), 4)

    cls = make_loader(build_dataset("cls", demo_root, "train", img_size=S), 4, shuffle=True, drop_last=True)
    sizes = []
    for images, labels, idx in cls:
        assert tuple(images.shape) == (4, 3, S, S)
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (4,)
        sizes.append(len(labels))
    assert sizes == [4, 4]  # 10 images, drop_last


def test_collate_directly(demo_root):
    seg, det, cls = (plain(task, demo_root, split="val") for task in datasets.TASKS)
    images, masks, idx = collate([seg[0], seg[2]])
    assert tuple(images.shape) == (2, 3, S, S) and tuple(masks.shape) == (2, S, S) and idx.tolist() == [0, 2]
    assert type(masks) is torch.Tensor and torch.equal(masks[1], seg[2][1].as_subclass(torch.Tensor))
    images, targets, idx = collate([det[0], det[1]])
    assert tuple(images.shape) == (2, 3, S, S) and len(targets) == 2
    assert targets[0]["boxes"].shape == (0, 4) and targets[1]["boxes"].shape[0] >= 1  # empty image kept
    assert type(targets[1]["boxes"]) is torch.Tensor
    images, labels, idx = collate([cls[3], cls[7]])
    assert labels.tolist() == [cls[3][1], cls[7][1]] and labels.dtype == torch.int64


def test_make_loader_shuffle_is_seeded(demo_root):
    ds = plain("cls", demo_root)
    order = lambda seed: torch.cat([b[2] for b in make_loader(ds, 4, shuffle=True, seed=seed)]).tolist()  # noqa
    assert order(0) == order(0)
    assert sorted(order(0)) == list(range(len(ds)))
    assert order(0) != order(1)


# ----------------------------------------------------------------------------- COCO ids
def test_sparse_coco_ids_map_through_categories(demo_root):
    ds = plain("det", demo_root)
    assert ds.cat_id_to_label == {cid: k for k, cid in enumerate(SPARSE_IDS)}
    assert ds.cat_id_to_label[16] == 2 and ds.cat_id_to_label[67] == 9
    coco = json.loads(coco_json(demo_root).read_text())
    image_index = {img["id"]: i for i, img in enumerate(ds.images)}
    for ann in coco["annotations"]:  # every annotation gets the index of its id in `categories`
        _, labels, _ = ds.boxes_of(image_index[ann["image_id"]])
        assert SPARSE_IDS.index(ann["category_id"]) in labels.tolist()


def test_category_16_gets_label_2(broken_copy):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    ann = next(a for a in coco["annotations"] if a["iscrowd"] == 0)
    ann["category_id"] = 16
    path.write_text(json.dumps(coco))
    ds = plain("det", broken_copy)
    i = next(k for k, img in enumerate(ds.images) if img["id"] == ann["image_id"])
    same_image = [a for a in coco["annotations"] if a["image_id"] == ann["image_id"]]
    _, labels, _ = ds.boxes_of(i)
    assert labels[same_image.index(ann)] == 2
    assert ds[i][1]["labels"][same_image.index(ann)] == 2


def test_shuffled_categories_map_by_sorted_id(broken_copy):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    random.Random(3).shuffle(coco["categories"])
    assert [c["id"] for c in coco["categories"]] != SPARSE_IDS
    path.write_text(json.dumps(coco))
    ds = plain("det", broken_copy)
    assert ds.cat_id_to_label == {cid: k for k, cid in enumerate(SPARSE_IDS)}
    assert ds.class_names == [name for _, name in demo_data.COCO_CATS]
    for i in range(len(ds)):
        _, labels, _ = ds.boxes_of(i)
        cats = [a["category_id"] for a in coco["annotations"] if a["image_id"] == ds.images[i]["id"]]
        assert labels.tolist() == [SPARSE_IDS.index(c) for c in cats]


# ----------------------------------------------------------------------------- crowd boxes
def test_crowd_boxes_are_returned_with_iscrowd(demo_root):
    """Demo image 1 of each split has a crowd first object: it stays in the target, flagged,
    so the loss can ignore it and the metric can treat it as COCO does."""
    coco = json.loads(coco_json(demo_root).read_text())
    crowd = [a for a in coco["annotations"] if a["iscrowd"]]
    assert crowd
    ds = build_dataset("det", demo_root, "train", img_size=S)
    for ann in crowd:
        i = next(k for k, img in enumerate(ds.images) if img["id"] == ann["image_id"])
        target = ds[i][1]
        assert 1 in target["iscrowd"].tolist()
        k = target["iscrowd"].tolist().index(1)
        assert target["labels"][k] == SPARSE_IDS.index(ann["category_id"])
        x, y, w, h = ann["bbox"]
        torch.testing.assert_close(ds.eval_target(i)["boxes"][k], torch.tensor([x, y, x + w, y + h], dtype=torch.float32))
        assert ds.eval_target(i)["iscrowd"][k] == 1


def test_eval_targets_carry_the_jsons_object_areas(demo_root):
    """COCO's size ranges (small / medium / large) use each annotation's area, not its box."""
    coco = json.loads(coco_json(demo_root).read_text())
    ds = build_dataset("det", demo_root, "train", img_size=S)
    for i, img in enumerate(ds.images):
        areas = [a["area"] for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert ds.eval_target(i)["area"].tolist() == pytest.approx(areas)
    assert any(a["area"] < a["bbox"][2] * a["bbox"][3] for a in coco["annotations"])  # not the boxes' areas


# ----------------------------------------------------------------------------- flips
FLIP = v2.RandomHorizontalFlip(p=1.0)


def test_flip_moves_seg_mask_with_image(demo_root):
    base, flipped = plain("seg", demo_root), build_dataset("seg", demo_root, "train", img_size=S, augment=FLIP)
    for i in range(len(base)):
        image, mask, _ = base[i]
        image_f, mask_f, _ = flipped[i]
        assert torch.equal(image_f, image.flip(-1))
        assert torch.equal(mask_f.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).flip(-1))
        assert not torch.equal(mask_f, mask)  # the demo objects are not mirror-symmetric in place


def object_pixels(image):
    """Pixels of the saturated demo shapes: the background is grey (max - min channel small)."""
    chroma = image.int().amax(0) - image.int().amin(0)
    return chroma > 60


def boxes_cover_objects(image, boxes, slack=1.5, tol=2.0):
    """None when every object pixel lies in a box (slack px for the antialiased resize) and
    each box is tight around the object pixels inside it; else a description of the mismatch."""
    ys, xs = torch.nonzero(object_pixels(image), as_tuple=True)
    centres = torch.stack([xs + 0.5, ys + 0.5], 1).float()
    inside_any = torch.zeros(len(centres), dtype=torch.bool)
    for box in boxes:
        x1, y1, x2, y2 = box.tolist()
        inside = ((centres[:, 0] > x1 - slack) & (centres[:, 0] < x2 + slack)
                  & (centres[:, 1] > y1 - slack) & (centres[:, 1] < y2 + slack))
        inside_any |= inside
        if inside.sum() < 4:
            return f"no object pixels in box {box.tolist()}"
        px, py = centres[inside, 0], centres[inside, 1]
        got = torch.tensor([px.min() - 0.5, py.min() - 0.5, px.max() + 0.5, py.max() + 0.5])
        if (got - box).abs().max() > tol:
            return f"box {box.tolist()} vs object pixels spanning {got.tolist()}"
    if not inside_any.all():
        return f"{int((~inside_any).sum())} object pixels outside every box"
    return None


def test_flip_moves_boxes_with_image(demo_root):
    base, flipped = plain("det", demo_root), build_dataset("det", demo_root, "train", img_size=S, augment=FLIP)
    checked = 0
    for i in range(len(base)):
        image, target, _ = base[i]
        image_f, target_f, _ = flipped[i]
        assert torch.equal(image_f, image.flip(-1))
        b, bf = target["boxes"].as_subclass(torch.Tensor), target_f["boxes"].as_subclass(torch.Tensor)
        expected = torch.stack([S - b[:, 2], b[:, 1], S - b[:, 0], b[:, 3]], 1)
        torch.testing.assert_close(bf, expected)
        assert torch.equal(target_f["labels"], target["labels"])
        assert torch.equal(target_f["iscrowd"], target["iscrowd"])
        # The boxes cover the drawn objects, before and after the flip ...
        assert boxes_cover_objects(image, b) is None, f"image {i}: {boxes_cover_objects(image, b)}"
        assert boxes_cover_objects(image_f, bf) is None, f"image {i}: {boxes_cover_objects(image_f, bf)}"
        # ... and the check has teeth: boxes left unflipped do not fit the flipped image.
        if len(b):
            assert boxes_cover_objects(image_f, b) is not None
        checked += len(b)
    assert checked >= 5


def test_default_train_augmentation_is_consistent(demo_root):
    """The default train pipeline (random flip + colour jitter) keeps mask and boxes aligned:
    whichever way the coin fell, the target equals the plain target or its mirror image."""
    torch.manual_seed(0)
    seg, seg_plain = build_dataset("seg", demo_root, "train", img_size=S), plain("seg", demo_root)
    det, det_plain = build_dataset("det", demo_root, "train", img_size=S), plain("det", demo_root)
    flips = 0
    for _ in range(3):
        for i in range(len(seg)):
            m, m0 = seg[i][1].as_subclass(torch.Tensor), seg_plain[i][1].as_subclass(torch.Tensor)
            assert torch.equal(m, m0) or torch.equal(m, m0.flip(-1))
            flips += int(not torch.equal(m, m0))
        for i in range(1, len(det)):
            b, b0 = det[i][1]["boxes"].as_subclass(torch.Tensor), det_plain[i][1]["boxes"].as_subclass(torch.Tensor)
            mirrored = torch.stack([S - b0[:, 2], b0[:, 1], S - b0[:, 0], b0[:, 3]], 1)
            assert torch.allclose(b, b0) or torch.allclose(b, mirrored)
    assert 0 < flips < 3 * len(seg)


# ----------------------------------------------------------------------------- mosaic
def det_samples_with_objects(demo_root, count=4):
    ds = plain("det", demo_root)
    samples = [ds[i][:2] for i in range(len(ds)) if len(ds[i][1]["boxes"])]
    assert len(samples) >= count
    return samples[:count]


def test_mosaic_window_on_the_first_image_gives_it_back(demo_root):
    samples = det_samples_with_objects(demo_root)
    image, target = datasets.mosaic(samples, 0, 0)
    first_image, first_target = samples[0]
    assert torch.equal(image, first_image)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), first_target["boxes"].as_subclass(torch.Tensor))
    assert torch.equal(target["labels"], first_target["labels"])
    assert torch.equal(target["iscrowd"], first_target["iscrowd"])


# Windows of the demo mosaic that cut no object down to a sliver (a sliver under 2 px loses its
# box, and a box 2-3 px wide cannot be checked for tightness against antialiased pixels).
@pytest.mark.parametrize("top, left", [(16, 16), (16, 48), (32, 16), (48, 16), (48, 48)])
def test_mosaic_boxes_follow_their_images(demo_root, top, left):
    samples = det_samples_with_objects(demo_root)
    image, target = datasets.mosaic(samples, top, left)
    check_image(image)
    boxes = target["boxes"].as_subclass(torch.Tensor)
    assert len(boxes) == len(target["labels"]) == len(target["iscrowd"]) >= 2
    # the image is the window of the 2 x 2 tiling
    tiling = torch.cat([torch.cat([samples[0][0], samples[1][0]], 2), torch.cat([samples[2][0], samples[3][0]], 2)], 1)
    assert torch.equal(image, tiling[:, top:top + S, left:left + S])
    assert boxes_cover_objects(image, boxes) is None
    # the check has teeth: the boxes as they were in their own images do not fit
    unshifted = torch.cat([t["boxes"].as_subclass(torch.Tensor) for _, t in samples])
    assert boxes_cover_objects(image, unshifted.clamp(0, S)) is not None


def test_det_mosaic_probability(demo_root):
    """mosaic=0: the plain samples, without drawing a random number (default runs unchanged);
    mosaic=1: every sample a seeded mosaic whose top-left image is the sample's own."""
    plain_det = plain("det", demo_root)
    off = build_dataset("det", demo_root, "train", img_size=S, train=False, mosaic=0.0)
    always = build_dataset("det", demo_root, "train", img_size=S, train=False, mosaic=1.0)
    state = torch.get_rng_state()
    for i in range(len(off)):
        assert torch.equal(off[i][0], plain_det[i][0])
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    first = [always[i] for i in range(len(always))]
    torch.manual_seed(0)
    again = [always[i] for i in range(len(always))]
    for (image, _, i), (image_again, _, _) in zip(first, again):
        check_image(image)
        assert torch.equal(image, image_again)
        # the window's corner pixel lies in the sample's own image, at most 3/4 of the way in
        own = plain_det[i][0]
        assert any(torch.equal(image[:, 0, 0], own[:, top, left])
                   for top in range(S // 4, 3 * S // 4 + 1) for left in range(S // 4, 3 * S // 4 + 1))
        assert not torch.equal(image, own)


# ----------------------------------------------------------------------------- cache
@pytest.mark.parametrize("task", datasets.TASKS)
def test_cache_false_equals_cache_true(demo_root, task):
    cached, fresh = plain(task, demo_root, cache=True), plain(task, demo_root, cache=False)
    assert cached._resized is not None and fresh._resized is None
    assert len(cached) == len(fresh)
    for i in range(len(cached)):
        (a, ta, _), (b, tb, _) = cached[i], fresh[i]
        assert torch.equal(a, b)
        if task == "det":
            assert ta.keys() == tb.keys()
            for k in ta:
                assert torch.equal(ta[k].as_subclass(torch.Tensor), tb[k].as_subclass(torch.Tensor))
        elif task == "seg":
            assert torch.equal(ta.as_subclass(torch.Tensor), tb.as_subclass(torch.Tensor))
        else:
            assert ta == tb
    assert torch.equal(cached.images_uint8(), fresh.images_uint8())


# ----------------------------------------------------------------------------- bad inputs
def expect_data_error(task, root, names, split="train", cache=True, match=None):
    """Building (and, without cache, reading) the dataset raises one DataError, a single
    line that names the offending file."""
    with pytest.raises(DataError) as info:
        ds = build_dataset(task, root, split, img_size=S, cache=cache)
        for i in range(len(ds)):
            ds[i]
    message = str(info.value)
    assert "\n" not in message, message
    for name in [names] if isinstance(names, (str, Path)) else names:
        assert str(name) in message, message
    if match:
        assert match in message, message
    return message


@pytest.mark.parametrize("task,folder", [("seg", "mini_voc_seg"), ("det", "mini_coco_det"),
                                         ("cls", "imagenette-160")])
def test_missing_dataset_folder(broken_copy, task, folder):
    shutil.rmtree(broken_copy / folder)
    expect_data_error(task, broken_copy, broken_copy / folder, match="missing")


@pytest.mark.parametrize("task", datasets.TASKS)
def test_missing_data_root(tmp_path, task):
    expect_data_error(task, tmp_path / "nowhere", tmp_path / "nowhere")


def test_missing_split_file(broken_copy):
    split_file = broken_copy / "mini_voc_seg" / "ImageSets" / "Segmentation" / "val.txt"
    split_file.unlink()
    expect_data_error("seg", broken_copy, split_file, split="val", match="split file")


def test_missing_coco_json(broken_copy):
    coco_json(broken_copy, "val").unlink()
    expect_data_error("det", broken_copy, coco_json(broken_copy, "val"), split="val")


def test_empty_split_file(broken_copy):
    split_file = broken_copy / "mini_voc_seg" / "ImageSets" / "Segmentation" / "train.txt"
    split_file.write_text("\n\n")
    expect_data_error("seg", broken_copy, split_file)


def test_split_id_without_image(broken_copy):
    split_file = broken_copy / "mini_voc_seg" / "ImageSets" / "Segmentation" / "train.txt"
    split_file.write_text(split_file.read_text() + "2099_ghost\n")
    expect_data_error("seg", broken_copy, broken_copy / "mini_voc_seg" / "JPEGImages" / "2099_ghost.jpg")


def test_missing_voc_image(broken_copy):
    image = broken_copy / "mini_voc_seg" / "JPEGImages" / f"{voc_ids(broken_copy)[3]}.jpg"
    image.unlink()
    expect_data_error("seg", broken_copy, image)


def test_missing_coco_image(broken_copy):
    coco = json.loads(coco_json(broken_copy).read_text())
    image = broken_copy / "mini_coco_det" / "images" / "train" / coco["images"][2]["file_name"]
    image.unlink()
    expect_data_error("det", broken_copy, image)


def test_missing_mask(broken_copy):
    mask = broken_copy / "mini_voc_seg" / "SegmentationClass" / f"{voc_ids(broken_copy)[2]}.png"
    mask.unlink()
    expect_data_error("seg", broken_copy, mask, match="mask")


def garbage(path):
    path.write_bytes(b"this is not an image \x00\xff\x13" * 40)


@pytest.mark.parametrize("cache", [True, False])
def test_unreadable_voc_image(broken_copy, cache):
    image = broken_copy / "mini_voc_seg" / "JPEGImages" / f"{voc_ids(broken_copy)[1]}.jpg"
    garbage(image)
    expect_data_error("seg", broken_copy, image, cache=cache, match="unreadable")


@pytest.mark.parametrize("cache", [True, False])
def test_unreadable_coco_image(broken_copy, cache):
    coco = json.loads(coco_json(broken_copy).read_text())
    image = broken_copy / "mini_coco_det" / "images" / "train" / coco["images"][4]["file_name"]
    garbage(image)
    expect_data_error("det", broken_copy, image, cache=cache, match="unreadable")


def test_unreadable_imagenette_image(broken_copy):
    image = sorted((broken_copy / "imagenette-160" / "val" / demo_data.WNIDS[5]).glob("*.JPEG"))[0]
    garbage(image)
    expect_data_error("cls", broken_copy, image, split="val", match="unreadable")


def test_truncated_image(broken_copy):
    image = broken_copy / "mini_voc_seg" / "JPEGImages" / f"{voc_ids(broken_copy)[0]}.jpg"
    image.write_bytes(image.read_bytes()[:200])
    expect_data_error("seg", broken_copy, image)


def test_unreadable_mask(broken_copy):
    mask = broken_copy / "mini_voc_seg" / "SegmentationClass" / f"{voc_ids(broken_copy)[1]}.png"
    garbage(mask)
    expect_data_error("seg", broken_copy, mask)


def test_mask_size_differs_from_image(broken_copy):
    mask = broken_copy / "mini_voc_seg" / "SegmentationClass" / f"{voc_ids(broken_copy)[0]}.png"
    with Image.open(mask) as img:
        small = img.resize((img.width // 2, img.height // 2), Image.NEAREST)
        small.putpalette(img.getpalette())
    small.save(mask)
    expect_data_error("seg", broken_copy, mask, match="size")


def test_mask_with_invalid_value(broken_copy):
    mask = broken_copy / "mini_voc_seg" / "SegmentationClass" / f"{voc_ids(broken_copy)[2]}.png"
    with Image.open(mask) as img:
        values = np.array(img)
        palette = img.getpalette()
    values[5:9, 5:9] = 50
    out = Image.fromarray(values, mode="P")
    out.putpalette(palette)
    out.save(mask)
    expect_data_error("seg", broken_copy, mask, match="50")


def test_rgb_mask_is_rejected(broken_copy):
    """An RGB colour PNG instead of palette indices: an error, not colours read as classes."""
    mask = broken_copy / "mini_voc_seg" / "SegmentationClass" / f"{voc_ids(broken_copy)[0]}.png"
    with Image.open(mask) as img:
        img.convert("RGB").save(mask)
    expect_data_error("seg", broken_copy, mask)


def test_unknown_category_id(broken_copy):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    coco["annotations"][3]["category_id"] = 2  # a real COCO id (bicycle) that is not in `categories`
    path.write_text(json.dumps(coco))
    message = expect_data_error("det", broken_copy, path, match="category_id")
    assert " 2," in message or " 2 " in message or message.endswith(" 2")


def test_annotation_for_unknown_image(broken_copy):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    coco["annotations"][0]["image_id"] = 999999
    path.write_text(json.dumps(coco))
    expect_data_error("det", broken_copy, path, match="999999")


def test_invalid_json(broken_copy):
    path = coco_json(broken_copy)
    path.write_text(path.read_text()[:-40])  # truncated: not valid JSON
    expect_data_error("det", broken_copy, path)


def test_json_without_coco_keys(broken_copy):
    path = coco_json(broken_copy)
    path.write_text(json.dumps({"images": []}))
    expect_data_error("det", broken_copy, path)


@pytest.mark.parametrize("entry,field", [("images", "file_name"), ("images", "id"), ("images", "height"),
                                         ("annotations", "bbox"), ("annotations", "area")])
def test_coco_entry_missing_field(broken_copy, entry, field):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    del coco[entry][2][field]
    path.write_text(json.dumps(coco))
    expect_data_error("det", broken_copy, path, match=field)


def test_coco_image_size_differs_from_json(broken_copy):
    path = coco_json(broken_copy)
    coco = json.loads(path.read_text())
    coco["images"][1]["width"] += 7
    path.write_text(json.dumps(coco))
    expect_data_error("det", broken_copy, coco["images"][1]["file_name"])


def test_empty_imagenette_split(broken_copy):
    folder = broken_copy / "imagenette-160" / "val"
    shutil.rmtree(folder)
    folder.mkdir()
    expect_data_error("cls", broken_copy, folder, split="val")


# ----------------------------------------------------------------------------- command line
def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "datasets.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_counts_demo(demo_root):
    proc = run_cli("--data_root", demo_root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for (task, split), n in DEMO_COUNTS.items():
        assert f"{task} {split} {n}" in lines, proc.stdout


@pytest.mark.parametrize("damage", ["missing_root", "garbage_image"])
def test_cli_broken_root_fails_cleanly(broken_copy, damage):
    if damage == "missing_root":
        root = broken_copy / "does_not_exist"
        name = root
    else:
        root = broken_copy
        name = broken_copy / "imagenette-160" / "train" / demo_data.WNIDS[0]
        name = sorted(name.glob("*.JPEG"))[0]
        garbage(name)
    proc = run_cli("--data_root", root)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1, proc.stderr
    assert str(name) in err[0]


def test_cli_make_demo(tmp_path):
    out = tmp_path / "made"
    proc = run_cli("--make-demo", out)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout
    for sub in ["imagenette-160/train", "imagenette-160/val", "mini_coco_det/images/train",
                "mini_coco_det/images/val", "mini_voc_seg/JPEGImages", "mini_voc_seg/SegmentationClass"]:
        assert (out / sub).is_dir(), sub
    for f in ["mini_coco_det/annotations/instances_train.json", "mini_coco_det/annotations/instances_val.json",
              "mini_voc_seg/ImageSets/Segmentation/train.txt", "mini_voc_seg/ImageSets/Segmentation/val.txt"]:
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "imagenette-160" / "train").iterdir()) == demo_data.WNIDS
    for task in datasets.TASKS:  # and the loaders accept what it wrote
        assert len(build_dataset(task, out, "val", img_size=32, cache=False)) > 0


# ----------------------------------------------------------------------------- real data
REAL_SIZE = 224


@pytest.mark.parametrize("task", datasets.TASKS)
def test_real_data_one_batch(real_data_root, task):
    ds = build_dataset(task, real_data_root, "val", img_size=REAL_SIZE, cache=False)
    assert len(ds) == 60
    batch = 8
    images, targets, idx = next(iter(make_loader(ds, batch, shuffle=True)))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (batch, 3, REAL_SIZE, REAL_SIZE)
    assert tuple(idx.shape) == (batch,)
    if task == "seg":
        assert targets.dtype == torch.uint8 and tuple(targets.shape) == (batch, REAL_SIZE, REAL_SIZE)
        assert set(targets.unique().tolist()) <= set(range(21)) | {255}
    elif task == "det":
        assert len(targets) == batch
        for t in targets:
            assert t["boxes"].shape == (len(t["labels"]), 4)
            assert ((t["labels"] >= 0) & (t["labels"] <= 9)).all()
            if len(t["boxes"]):
                assert (t["boxes"] >= -1e-3).all() and (t["boxes"] <= REAL_SIZE + 1e-3).all()
        assert ds.class_names[:3] == ["person", "car", "bird"]
    else:
        assert targets.dtype == torch.int64 and tuple(targets.shape) == (batch,)
        assert ((targets >= 0) & (targets <= 9)).all()
        assert len(ds.wnids) == 10


def test_real_imagenette_class_names(real_data_root):
    ds = build_dataset("cls", real_data_root, "val", img_size=32, cache=False)
    assert ds.wnids == sorted(datasets.IMAGENETTE_NAMES)
    assert ds.class_names[9] == "parachute"


def test_real_data_cli_counts(real_data_root):
    proc = run_cli("--data_root", real_data_root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for task in datasets.TASKS:
        assert f"{task} train 240" in lines, proc.stdout
        assert f"{task} val 60" in lines, proc.stdout


def test_scale_jitter_moves_boxes_with_image(demo_root):
    """Zoom in/out + shift (detection's --det_scale_jitter): boxes still fit the drawn objects,
    labels and crowd flags stay paired with their boxes, and the boxes really moved."""
    torch.manual_seed(0)
    jitter = datasets.train_augmentation("det", color_jitter=False, scale_jitter=(0.7, 1.3))
    det, det_plain = build_dataset("det", demo_root, "train", img_size=S, augment=jitter), plain("det", demo_root)
    moved = 0
    for i in range(len(det)):
        image, target, _ = det[i]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert len(boxes) == len(target["labels"]) == len(target["iscrowd"])
        assert boxes_cover_objects(image, boxes, tol=3.0) is None, f"image {i}: {boxes_cover_objects(image, boxes)}"
        moved += int(boxes.shape != det_plain[i][1]["boxes"].shape
                     or not torch.allclose(boxes, det_plain[i][1]["boxes"].as_subclass(torch.Tensor)))
    assert moved >= len(det) // 2


def test_scale_jitter_drops_boxes_pushed_out_with_their_labels():
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, 6, 6], [20, 20, 44, 44]], format="XYXY", canvas_size=(64, 64)),
              "labels": torch.tensor([3, 7]), "iscrowd": torch.tensor([1, 0])}
    # A 2x zoom (shift at most 6.4 px) pushes the corner box out and keeps the central one, twice as big.
    zoom = datasets.train_augmentation("det", color_jitter=False, scale_jitter=(2.0, 2.0))
    for seed in range(5):
        torch.manual_seed(seed)
        _, out = zoom(image, target)
        assert out["labels"].tolist() == [7] and out["iscrowd"].tolist() == [0]
        x1, y1, x2, y2 = out["boxes"].as_subclass(torch.Tensor)[0].tolist()
        assert x2 - x1 == pytest.approx(48, abs=1e-3) and y2 - y1 == pytest.approx(48, abs=1e-3)


def test_classification_batch_mixing_is_off_at_zero_alphas():
    assert datasets.classification_batch_mixing(0.0, 0.0, 10) is None


def test_cutmix_labels_weigh_each_image_by_the_area_it_keeps():
    torch.manual_seed(0)
    # every image one constant value, so each pixel says which image it came from
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 32, 32).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    mixing = datasets.classification_batch_mixing(0.0, 1.0, 10)
    for _ in range(5):
        mixed, soft = mixing(images, labels)
        assert soft.shape == (4, 10) and torch.allclose(soft.sum(1), torch.ones(4))
        for i in range(4):
            kept = (mixed[i, 0] == i).float().mean()
            assert soft[i, i].item() == pytest.approx(kept.item(), abs=1e-6)
            pasted = mixed[i, 0][mixed[i, 0] != i].unique()
            assert len(pasted) <= 1, "one other image is pasted in"
            if len(pasted):
                assert soft[i, int(pasted)].item() == pytest.approx(1 - kept.item(), abs=1e-6)


def test_mixup_blends_images_and_labels_with_the_same_weight():
    torch.manual_seed(0)
    images = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    labels = torch.tensor([0, 1, 2, 3])
    mixed, soft = datasets.classification_batch_mixing(0.2, 0.0, 10)(images, labels)
    for i in range(4):
        value = mixed[i].unique()
        assert len(value) == 1, "a blend is uniform over the image"
        # image i holds the value i, so the blend's value is the label-weighted mean of the indices
        assert value.item() == pytest.approx((soft[i, :4] * torch.arange(4.0)).sum().item(), abs=1e-5)
    assert (soft.max(1).values < 1).any(), "some pair is actually blended"
