"""det_probe.py: the neck's cached input is what forward feeds it, the probe trains the layers
above the cached one on the views, and bad flags are refused."""
import pytest
import torch

import det_probe
from models import UnifiedMultiTaskModel


@pytest.fixture
def weights(tmp_path):
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    path = tmp_path / "model_s1_best.pt"
    torch.save({"model": model.state_dict(), "backbone": "efficientnet_lite0", "img_sizes":
                {"seg": 64, "det": 64, "cls": 64}, "stage": 1}, path)
    return path


def test_cached_layer_inputs_are_what_forward_feeds_that_layer():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval()
    images = (torch.rand(2, 3, 64, 64) * 255).to(torch.uint8)
    with torch.no_grad():
        maps = model.feature_maps(model.prepare_input(images))
        neck_input = torch.cat(model.backbone_taps(model.prepare_input(images)), 1)
        assert neck_input.shape == (2, 112 + 1280, 4, 4) and torch.equal(model.neck(neck_input), maps["neck"])
        for layer, expected in (("neck", neck_input), ("shared_conv3", maps["shared_conv2"])):
            cached = det_probe.layer_inputs(model, images, layer, amp_dtype=None)
            assert cached.dtype == torch.bfloat16   # stored at half the memory
            assert torch.allclose(cached.float(), expected, rtol=1e-2, atol=1e-2), layer
            # the layers above, run on the exact input, give forward's det output
            assert torch.equal(det_probe.detector_above(model, layer, expected), model.det_head(maps["shared_conv3"]))


def test_probe_fits_its_training_views(weights, demo_root, capsys):
    history = det_probe.main(["--weights", str(weights), "--data_root", str(demo_root), "--device", "cpu",
                              "--layer", "neck", "--fresh", "--views", "1", "--epochs", "30", "--eval_every", "10",
                              "--batch_size", "8"])  # one full batch per epoch: a smooth loss
    assert [h["epoch"] for h in history] == [10, 20, 30]
    for h in history:
        assert 0.0 <= h["val"]["mAP_50"] <= 1.0 and 0.0 <= h["train_view"]["mAP_50"] <= 1.0
    first, last = (sum(h["losses"].values()) for h in (history[0], history[-1]))
    assert last < first, "the detection loss on the cached views falls"
    assert history[-1]["train_view"]["mAP_50"] > history[0]["train_view"]["mAP_50"], "and the views get detected"
    out = capsys.readouterr().out
    assert "learning neck, shared_conv1, shared_conv2, shared_conv3, det_head (fresh)" in out


@pytest.mark.parametrize("flags", [["--layer", "backbone"], ["--views", "0"], ["--epochs", "0"]])
def test_bad_flags_are_rejected(weights, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        det_probe.main(["--weights", str(weights), *flags])
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        det_probe.main(["--weights", str(tmp_path / "none.pt")])
    assert "none.pt" in str(exit_info.value) and "not found" in str(exit_info.value)
