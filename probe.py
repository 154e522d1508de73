"""Linear probe: how much of the classification task each layer of a checkpoint still holds.

For every stride-16 map on the way to the heads (backbone, neck, shared convs 1-3), the
Imagenette images are passed through the checkpoint, each map is average-pooled, and a
logistic regression (standardised features, L2, L-BFGS) is fitted on the train split and
scored on val. A layer whose probe is low cannot give the GAP + Linear cls head much,
whatever the head learns: it shows where a sequential pass loses what the backbone knew.
Where the classes are ImageNet wnids (Imagenette's are), one more row scores the backbone's
own pretrained ImageNet classifier on the same pooled backbone features, nothing fitted: the
teacher of train.py --backbone_probe imagenet.

    python probe.py --weights runs/seed0/model_s2_best.pt --data_root DL_data
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from checkpoints import checkpoint_img_sizes
from datasets import DataError, build_dataset, make_loader
from eval import load_model
from models import PretrainedWeightsError, imagenet_classifier, input_size, pick_device
from options import HelpWithDefaults

PROBE_WEIGHT_DECAY = 1e-2  # the L2 weight of every linear probe here and of train.py's backbone probe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--weights", required=True, help="a checkpoint written by train.py")
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets")
    p.add_argument("--weight_decay", type=float, default=PROBE_WEIGHT_DECAY,
                   help="L2 weight of the logistic regression")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--img_size", type=input_size, help="input size of the classification images (default: the checkpoint's)")
    return p.parse_args(argv)


@torch.no_grad()  # not inference_mode: the probe fits on these tensors with autograd
def pooled_features(model, dataset, batch_size=32):
    """({layer: (N, C) pooled features}, (N,) labels) over a dataset."""
    features, labels = {}, []
    for images, targets, _ in make_loader(dataset, batch_size, shuffle=False):
        for name, fmap in model.feature_maps(model.prepare_input(images)).items():
            features.setdefault(name, []).append(fmap.float().mean(dim=(2, 3)).cpu())
        labels.append(targets)
    return {name: torch.cat(chunks) for name, chunks in features.items()}, torch.cat(labels)


def fit_linear_probe(train_x, train_y, num_classes, weight_decay, max_iter=300):
    """A multinomial logistic regression (standardised features, L2, L-BFGS) fitted on
    (train_x, train_y); returns a function features -> logits, for features on train_x's device."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6  # statistics of the train split only
    train_x = (train_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def logits(x):
        return ((x.float() - mean) / std) @ weight + bias

    return logits


def probe_accuracy(train_x, train_y, val_x, val_y, num_classes, weight_decay, max_iter=300):
    """Fit a linear probe on (train_x, train_y); Top-1 on (train, val)."""
    logits = fit_linear_probe(train_x, train_y, num_classes, weight_decay, max_iter)
    with torch.no_grad():
        return [(logits(x).argmax(1) == y).float().mean().item() for x, y in ((train_x, train_y), (val_x, val_y))]


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, ckpt = load_model(args.weights, device)
        # train=False: no augmentation, so the probe is deterministic
        img_size = args.img_size or checkpoint_img_sizes(ckpt)["cls"]
        splits = {split: build_dataset("cls", args.data_root, split, img_size, train=False, cache=False)
                  for split in ("train", "val")}
    except (DataError, ValueError) as err:
        sys.exit(f"error: {err}")
    train_x, train_y = pooled_features(model, splits["train"])
    val_x, val_y = pooled_features(model, splits["val"])
    num_classes = len(splits["val"].class_names)
    print(f"linear probe of {args.weights} (stage {ckpt.get('stage')}) on cls: "
          f"{len(train_y)} train / {len(val_y)} val images at {img_size} px")
    print(f"{'layer':<14} {'channels':>8} {'train top1':>10} {'val top1':>9}")
    results = {}
    for name in train_x:
        train_acc, val_acc = probe_accuracy(train_x[name], train_y, val_x[name], val_y, num_classes,
                                            args.weight_decay)
        results[name] = val_acc
        print(f"{name:<14} {train_x[name].shape[1]:>8} {train_acc:>10.4f} {val_acc:>9.4f}")
    if not ckpt.get("args", {}).get("pretrained", True):
        print("the backbone's ImageNet classifier: not scored (the run began from random weights)")
        return results
    try:
        weight, bias = imagenet_classifier(ckpt["backbone"], splits["val"].wnids)
    except (ValueError, PretrainedWeightsError) as err:
        print(f"the backbone's ImageNet classifier: not scored ({err})")
        return results
    train_acc, val_acc = [((x["backbone_s32"] @ weight.T + bias).argmax(1) == y).float().mean().item()
                          for x, y in ((train_x, train_y), (val_x, val_y))]
    results["imagenet_classifier"] = val_acc
    channels = train_x["backbone_s32"].shape[1]
    print(f"{'imagenet_head':<14} {channels:>8} {train_acc:>10.4f} {val_acc:>9.4f}  (backbone_s32 through the "
          "backbone's own ImageNet classifier, not fitted)")
    return results


if __name__ == "__main__":
    main()
