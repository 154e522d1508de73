"""Linear probe: how much of the classification task each layer of a checkpoint still holds.

For every stride-16 map on the way to the heads (backbone, neck, shared convs 1-3), the
Imagenette images are passed through the checkpoint, each map is average-pooled, and a
logistic regression (standardised features, L2, L-BFGS) is fitted on the train split and
scored on val. A layer whose probe is low cannot give the GAP + Linear cls head much,
whatever the head learns: it shows where a sequential pass loses what the backbone knew.

    python probe.py --weights runs/seed0/model_s2_best.pt --data_root DL_data
"""
import argparse
import sys

from datasets import DataError, build_dataset
from eval import load_model
from linear_probe import accuracy, fit_logistic_regression, pooled_features
from models import pick_device
from train import HelpWithDefaults, checkpoint_img_sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--weights", required=True, help="a checkpoint written by train.py")
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets")
    p.add_argument("--weight_decay", type=float, default=1e-2, help="L2 weight of the logistic regression")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--img_size", type=int, help="input size of the classification images (default: the checkpoint's)")
    return p.parse_args(argv)


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
        weight, bias = fit_logistic_regression(train_x[name], train_y, num_classes, args.weight_decay)
        train_acc, val_acc = accuracy(weight, bias, train_x[name], train_y), accuracy(weight, bias, val_x[name], val_y)
        results[name] = val_acc
        print(f"{name:<14} {train_x[name].shape[1]:>8} {train_acc:>10.4f} {val_acc:>9.4f}")
    return results


if __name__ == "__main__":
    main()
