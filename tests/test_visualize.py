"""visualize.save_visualizations on the tiny demo data with an untrained model (CPU, a few seconds)."""
import numpy as np
import pytest
import torch

from datasets import VOC_CLASSES, VOID, build_dataset
from demo_data import make_demo
from models import UnifiedMultiTaskModel
from visualize import OVERLAY_ALPHA, legend_handles, mask_overlay, save_visualizations

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("vis") / "data")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)


@pytest.mark.parametrize("task", ["seg", "det", "cls"])
def test_writes_one_png_per_image(task, data_root, model, tmp_path):
    dataset = build_dataset(task, data_root, "val", img_size=64)
    model.train()
    paths = save_visualizations(model, dataset, task, tmp_path / "vis", num_images=2)
    assert paths == [tmp_path / "vis" / f"{task}_{k:02d}.png" for k in range(2)]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 5_000  # a real picture, not an empty canvas
    assert model.training  # the caller's mode is restored


def test_legend_colours_are_the_overlay_colours():
    # The masks are drawn half-transparent over the photo; a legend in full-strength colours would
    # not match them by eye, so each patch is filled with the very RGBA its class is drawn in.
    mask = np.array([[0, 1, 15, VOID]])
    handles = legend_handles(np.unique(mask).tolist(), VOC_CLASSES)
    assert [h.get_label() for h in handles] == ["aeroplane", "person", "void"]  # no background entry
    overlay = mask_overlay(mask)[0, 1:]
    assert OVERLAY_ALPHA < 1 and (overlay[:, 3] == OVERLAY_ALPHA).all()
    for handle, rgba in zip(handles, overlay):
        assert handle.get_facecolor() == pytest.approx(tuple(rgba))
