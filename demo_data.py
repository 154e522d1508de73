"""Tiny synthetic data in the exact DL_data layout, so the whole pipeline (and the
tests) can run in minutes without the real images.

    python demo_data.py DIR [--n_train 48 --n_val 24 --seed 0]   # the counts train.py --demo uses

Every picture is a noisy grey background with coloured shapes whose colour (and
shape) depends on the class, so a model can really learn something from it.
Counts per split: classification max(n, 10) images spread round-robin over the 10
classes (so each class has at least one); detection and segmentation max(n, 2).
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFilter

WNIDS = ['n01440764', 'n02102040', 'n02979186', 'n03000684', 'n03028079',
         'n03394916', 'n03417042', 'n03425413', 'n03445777', 'n03888257']
# Original sparse COCO ids: the loaders must map them through `categories`.
COCO_CATS = [(1, 'person'), (3, 'car'), (16, 'bird'), (31, 'handbag'), (44, 'bottle'),
             (47, 'cup'), (51, 'bowl'), (62, 'chair'), (63, 'couch'), (67, 'dining table')]
SHAPES = ['rect', 'ellipse', 'triangle']
MARGIN = 3  # objects never touch the border, so the border shows the background


def hue_colors(n):
    """n saturated colours spread over the hue wheel: far from the grey background."""
    return [ImageColor.getrgb(f'hsv({360 * i // n},100%,100%)') for i in range(n)]


def voc_palette():
    """The standard PASCAL VOC palette (bit-shuffling of the label index), 256 * RGB."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def background(rng, w, h):
    """Mid-grey with a slight tint and pixel noise, so the shapes are not trivially flat."""
    base = rng.integers(90, 166) + rng.integers(-10, 11, size=3)
    pixels = base + rng.normal(0, 6, size=(h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), 'RGB')


def span(rng, lo, hi, min_len):
    """Random inclusive interval [a, b] with lo <= a <= b <= hi and b - a + 1 >= min_len."""
    length = int(rng.integers(min_len, hi - lo + 2))
    a = int(rng.integers(lo, hi - length + 2))
    return a, a + length - 1


def shape_mask(size, kind, box):
    """'L' mask (255 inside) of one filled shape in the inclusive box [x0, y0, x1, y1].
    Boxes and areas are read back from this mask, so they match the drawn pixels exactly."""
    mask = Image.new('L', size, 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if kind == 'rect':
        draw.rectangle(box, fill=255)
    elif kind == 'ellipse':
        draw.ellipse(box, fill=255)
    else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=255)
    return mask


def random_size(rng):
    return int(rng.integers(120, 201)), int(rng.integers(96, 161))


def make_classification(root, counts, rng):
    colors = hue_colors(10)
    k = 0  # one counter over both splits: no file name repeats
    for split, n in counts.items():
        for j in range(max(n, 10)):
            c = j % 10
            short, long = 160, int(rng.integers(160, 241))  # Imagenette-160: short side 160
            w, h = (long, short) if rng.random() < 0.7 else (short, long)
            img = background(rng, w, h)
            x = span(rng, MARGIN, w - 1 - MARGIN, 60)
            y = span(rng, MARGIN, h - 1 - MARGIN, 60)
            img.paste(colors[c], mask=shape_mask(img.size, SHAPES[c % 3], (x[0], y[0], x[1], y[1])))
            folder = root / 'imagenette-160' / split / WNIDS[c]
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{WNIDS[c]}_demo{k:05d}.JPEG', quality=95, subsampling=0)
            k += 1


def make_detection(root, counts, rng):
    base = root / 'mini_coco_det'
    colors = hue_colors(len(COCO_CATS))
    categories = [{'id': i, 'name': name, 'supercategory': 'none'} for i, name in COCO_CATS]
    image_id = ann_id = 1  # ids are unique over both splits, as in COCO
    for split, n in counts.items():
        (base / 'images' / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for j in range(max(n, 2)):
            w, h = random_size(rng)
            img = background(rng, w, h)
            # Image 0 of each split has no object; in image 1 the first object is a crowd.
            n_obj = 0 if j == 0 else int(rng.integers(1, 4))
            strip = w // max(n_obj, 1)  # one object per vertical strip: no overlaps
            for o in range(n_obj):
                x = span(rng, o * strip + MARGIN, (o + 1) * strip - 1 - MARGIN, 12)
                y = span(rng, MARGIN, h - 1 - MARGIN, 12)
                c = int(rng.integers(len(COCO_CATS)))
                mask = shape_mask(img.size, SHAPES[c % 3], (x[0], y[0], x[1], y[1]))
                img.paste(colors[c], mask=mask)
                left, top, right, bottom = mask.getbbox()  # right/bottom exclusive
                annotations.append({
                    'id': ann_id, 'image_id': image_id, 'category_id': COCO_CATS[c][0],
                    'bbox': [left, top, right - left, bottom - top],
                    'area': float(np.count_nonzero(np.asarray(mask))),
                    'iscrowd': int(j == 1 and o == 0)})
                ann_id += 1
            file_name = f'{image_id:012d}.jpg'
            img.save(base / 'images' / split / file_name, quality=95, subsampling=0)
            images.append({'id': image_id, 'file_name': file_name, 'height': h, 'width': w})
            image_id += 1
        coco = {'info': {'description': f'Demo Mini-COCO-Det {split}: synthetic shapes'},
                'images': images, 'annotations': annotations, 'categories': categories}
        (base / 'annotations').mkdir(parents=True, exist_ok=True)
        (base / 'annotations' / f'instances_{split}.json').write_text(json.dumps(coco))


def make_segmentation(root, counts, rng):
    base = root / 'mini_voc_seg'
    for sub in ['JPEGImages', 'SegmentationClass', 'ImageSets/Segmentation']:
        (base / sub).mkdir(parents=True, exist_ok=True)
    colors, palette = hue_colors(20), voc_palette()
    k = 0
    for split, n in counts.items():
        ids = []
        for _ in range(max(n, 2)):
            w, h = random_size(rng)
            img, label = background(rng, w, h), Image.new('P', (w, h), 0)
            for _ in range(int(rng.integers(1, 3))):  # later shapes may occlude earlier ones
                c = int(rng.integers(1, 21))
                x = span(rng, MARGIN, w - 1 - MARGIN, 16)
                y = span(rng, MARGIN, h - 1 - MARGIN, 16)
                mask = shape_mask(img.size, SHAPES[c % 3], (x[0], y[0], x[1], y[1]))
                # Like VOC: a 1-2 px void (255) band around each object.
                ring = mask.filter(ImageFilter.MaxFilter(2 * int(rng.integers(1, 3)) + 1))
                label.paste(255, mask=ring)
                label.paste(c, mask=mask)
                img.paste(colors[c - 1], mask=mask)
            label.putpalette(palette)
            image_id = f'2099_demo{k:05d}'  # VOC-like, distinct from the other tasks' names
            img.save(base / 'JPEGImages' / f'{image_id}.jpg', quality=95, subsampling=0)
            label.save(base / 'SegmentationClass' / f'{image_id}.png')
            ids.append(image_id)
            k += 1
        (base / 'ImageSets' / 'Segmentation' / f'{split}.txt').write_text('\n'.join(ids) + '\n')


TASK_DIRS = ('imagenette-160', 'mini_coco_det', 'mini_voc_seg')
MARKER = '.onehead_demo'  # written beside the data: this folder holds generated data only


def make_demo(root, n_train=48, n_val=24, seed=0):
    """Write the three demo datasets under root; return root. A folder demo data was written to
    before is rewritten from scratch (no image of an earlier, larger set stays behind); one that
    holds dataset folders without the marker, real data perhaps, is refused (FileExistsError)."""
    root = Path(root)
    if any((root / d).exists() for d in TASK_DIRS):
        if not (root / MARKER).exists():
            raise FileExistsError(f'{root}: holds dataset folders but no {MARKER} file (demo_data.py writes '
                                  'one; folders from before session 42 lack it): expected an empty or new folder')
        for d in TASK_DIRS:
            shutil.rmtree(root / d, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text('written by demo_data.make_demo\n')
    counts = {'train': n_train, 'val': n_val}
    # One generator per task, so changing one task's code leaves the others' data unchanged.
    for task, make in enumerate([make_classification, make_detection, make_segmentation]):
        make(root, counts, np.random.default_rng([seed, task]))
    return root


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='Write a tiny synthetic DL_data-style dataset.')
    parser.add_argument('root', help='output folder (use it as --data_root)')
    parser.add_argument('--n_train', type=int, default=48)
    parser.add_argument('--n_val', type=int, default=24)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    try:
        out = make_demo(args.root, args.n_train, args.n_val, args.seed)
    except FileExistsError as err:
        sys.exit(f'error: {err}')
    print(f'demo data written to {out.resolve()}')
