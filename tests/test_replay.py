"""replay.py: a replay batch carries the teacher's outputs on those very images."""
import torch

from datasets import build_dataset
from models import UnifiedMultiTaskModel
from replay import ReplayBank


def test_replay_samples_carry_the_teachers_outputs_on_those_very_images(demo_root):
    torch.manual_seed(0)
    teacher = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval()
    bank = ReplayBank(build_dataset("seg", demo_root, "train", 64), teacher, torch.Generator().manual_seed(0))
    images, outputs = bank.sample(8)
    with torch.no_grad():
        direct = teacher(teacher.prepare_input(images))["seg_coarse"]
    assert torch.allclose(outputs["seg_coarse"], direct, atol=1e-4)
