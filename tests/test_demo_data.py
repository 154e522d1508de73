"""demo_data.py must write data in the exact DL_data layout, with labels that match the pixels."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import demo_data

ROOT = Path(__file__).resolve().parents[1]

SPARSE_CATS = {1: 'person', 3: 'car', 16: 'bird', 31: 'handbag', 44: 'bottle',
               47: 'cup', 51: 'bowl', 62: 'chair', 63: 'couch', 67: 'dining table'}
COUNTS = {'train': 48, 'val': 24}  # the defaults, train.py --demo's


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    return demo_data.make_demo(tmp_path_factory.mktemp('demo'))


def load_coco(root, split):
    path = root / 'mini_coco_det' / 'annotations' / f'instances_{split}.json'
    return json.loads(path.read_text())


def voc_ids(root, split):
    path = root / 'mini_voc_seg' / 'ImageSets' / 'Segmentation' / f'{split}.txt'
    return path.read_text().split()


@pytest.mark.parametrize('split', ['train', 'val'])
def test_classification_layout(root, split):
    folder = root / 'imagenette-160' / split
    assert sorted(p.name for p in folder.iterdir()) == demo_data.WNIDS
    per_class = [sorted((folder / w).glob('*.JPEG')) for w in demo_data.WNIDS]
    assert all(len(files) >= 1 for files in per_class)  # every class in every split
    assert sum(map(len, per_class)) == max(COUNTS[split], 10)
    for files in per_class:
        with Image.open(files[0]) as img:
            assert img.mode == 'RGB' and min(img.size) == 160


@pytest.mark.parametrize('split', ['train', 'val'])
def test_detection_coco(root, split):
    coco = load_coco(root, split)
    assert {c['id']: c['name'] for c in coco['categories']} == SPARSE_CATS
    images = {im['id']: im for im in coco['images']}
    assert len(images) == COUNTS[split]
    for im in images.values():
        with Image.open(root / 'mini_coco_det' / 'images' / split / im['file_name']) as img:
            assert img.size == (im['width'], im['height'])
    for ann in coco['annotations']:
        assert set(ann) == {'id', 'image_id', 'category_id', 'bbox', 'area', 'iscrowd'}
        assert ann['category_id'] in SPARSE_CATS
        x, y, w, h = ann['bbox']
        im = images[ann['image_id']]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im['width'] and y + h <= im['height']
        assert 0 < ann['area'] <= w * h
    assert any(ann['iscrowd'] == 1 for ann in coco['annotations'])
    assert set(images) - {ann['image_id'] for ann in coco['annotations']}  # an empty image


@pytest.mark.parametrize('split', ['train', 'val'])
def test_detection_boxes_match_drawn_pixels(root, split):
    # Objects never overlap, so the pixels far from the background colour must be
    # exactly the union of the boxes (up to JPEG blur of a pixel or two).
    coco = load_coco(root, split)
    for im in coco['images']:
        path = root / 'mini_coco_det' / 'images' / split / im['file_name']
        img = np.asarray(Image.open(path), int)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        foreground = np.abs(img - np.median(border, axis=0)).sum(axis=2) > 150
        covered = np.zeros_like(foreground)
        for ann in coco['annotations']:
            if ann['image_id'] != im['id']:
                continue
            x, y, w, h = ann['bbox']
            ys, xs = np.nonzero(foreground[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2])
            ys, xs = ys + max(y - 2, 0), xs + max(x - 2, 0)
            assert abs(xs.min() - x) <= 1 and abs(xs.max() + 1 - (x + w)) <= 1
            assert abs(ys.min() - y) <= 1 and abs(ys.max() + 1 - (y + h)) <= 1
            covered[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
        assert not (foreground & ~covered).any(), f"{path.name}: object pixels outside every box"


@pytest.mark.parametrize('split', ['train', 'val'])
def test_segmentation_masks(root, split):
    ids = voc_ids(root, split)
    assert len(ids) == COUNTS[split]
    palette = demo_data.voc_palette()
    assert palette[3:6] == [128, 0, 0] and palette[-3:] == [224, 224, 192]  # class 1, void
    for image_id in ids:
        base = root / 'mini_voc_seg'
        with Image.open(base / 'JPEGImages' / f'{image_id}.jpg') as img, \
                Image.open(base / 'SegmentationClass' / f'{image_id}.png') as mask:
            assert mask.mode == 'P' and mask.size == img.size
            assert mask.getpalette()[:768] == palette
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= set(range(21)) | {255}
        assert {0, 255} <= values and values & set(range(1, 21))  # background, void, a class


def test_no_name_shared_between_tasks(root):
    cls = {p.stem for p in (root / 'imagenette-160').rglob('*.JPEG')}
    det = {p.stem for p in (root / 'mini_coco_det' / 'images').rglob('*.jpg')}
    seg = set(voc_ids(root, 'train') + voc_ids(root, 'val'))
    assert not (cls & det or cls & seg or det & seg)
    assert not set(voc_ids(root, 'train')) & set(voc_ids(root, 'val'))


def test_deterministic(tmp_path):
    a = demo_data.make_demo(tmp_path / 'a', n_train=3, n_val=2, seed=1)
    b = demo_data.make_demo(tmp_path / 'b', n_train=3, n_val=2, seed=1)
    c = demo_data.make_demo(tmp_path / 'c', n_train=3, n_val=2, seed=2)
    rel = 'mini_coco_det/annotations/instances_train.json'
    assert (a / rel).read_bytes() == (b / rel).read_bytes() != (c / rel).read_bytes()
    seg = 'mini_voc_seg/SegmentationClass/2099_demo00000.png'
    assert (a / seg).read_bytes() == (b / seg).read_bytes()


def test_command_line(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'demo_data.py'), str(tmp_path / 'd'),
                          '--n_train', '2', '--n_val', '2'],
                         capture_output=True, text=True, check=True).stdout
    assert str((tmp_path / 'd').resolve()) in out
    assert len(voc_ids(tmp_path / 'd', 'val')) == 2


def test_rewriting_a_demo_folder_starts_from_scratch_and_real_data_is_refused(tmp_path):
    root = demo_data.make_demo(tmp_path / 'd', n_train=12, n_val=2)
    demo_data.make_demo(root, n_train=10, n_val=2)  # fewer images: none of the first set stays
    assert len(list((root / 'imagenette-160' / 'train').rglob('*.JPEG'))) == 10
    real = tmp_path / 'real'
    (real / 'mini_voc_seg').mkdir(parents=True)
    (real / 'mini_voc_seg' / 'kept.txt').write_text('a real file')
    with pytest.raises(FileExistsError, match='no .onehead_demo file'):
        demo_data.make_demo(real)
    assert (real / 'mini_voc_seg' / 'kept.txt').read_text() == 'a real file'
