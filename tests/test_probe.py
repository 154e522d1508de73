"""probe.py: the logistic-regression probe separates what is separable and not what is not,
feature_maps agrees with forward, and the script runs on a checkpoint."""
import torch

import probe
from models import UnifiedMultiTaskModel


def test_probe_accuracy_separable_vs_random_labels():
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=generator) * 4
    labels = torch.arange(200) % 4
    features = centers[labels] + torch.randn(200, 16, generator=generator)
    train_acc, val_acc = probe.probe_accuracy(features[:120], labels[:120], features[120:], labels[120:], 4, 1e-2)
    assert train_acc == 1.0 and val_acc > 0.95
    noise = torch.randn(200, 16, generator=generator)  # labels carry no information about these
    _, val_acc = probe.probe_accuracy(noise[:120], labels[:120], noise[120:], labels[120:], 4, 1e-2)
    assert val_acc < 0.5


def test_feature_maps_are_what_forward_uses():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps, outputs = model.feature_maps(images), model(images)
    assert list(maps) == ["backbone_s32", "neck", "shared_conv1", "shared_conv2", "shared_conv3"]
    assert maps["backbone_s32"].shape == (2, 1280, 4, 4) and maps["neck"].shape == (2, 256, 4, 4)
    assert torch.equal(maps["shared_conv3"], outputs["feat"])


def test_probe_script_on_a_checkpoint(demo_root, tmp_path, capsys):
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    weights = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "backbone": "efficientnet_lite0", "img_size": 64, "stage": 2}, weights)
    results = probe.main(["--weights", str(weights), "--data_root", str(demo_root), "--device", "cpu"])
    assert set(results) == {"backbone_s32", "neck", "shared_conv1", "shared_conv2", "shared_conv3",
                            "imagenet_classifier"}, "the demo classes are Imagenette's wnids"
    assert all(0.0 <= v <= 1.0 for v in results.values())
    out = capsys.readouterr().out
    assert "shared_conv3" in out and "backbone's own ImageNet classifier, not fitted" in out
    torch.save({"model": model.state_dict(), "backbone": "efficientnet_lite0", "img_size": 64, "stage": 2,
                "args": {"pretrained": False}}, weights)
    results = probe.main(["--weights", str(weights), "--data_root", str(demo_root), "--device", "cpu"])
    assert "imagenet_classifier" not in results
    assert "ImageNet classifier: not scored (the run began from random weights)" in capsys.readouterr().out
    probe.main(["--weights", str(weights), "--data_root", str(demo_root), "--device", "cpu", "--img_size", "96"])
    assert "at 96 px" in capsys.readouterr().out
