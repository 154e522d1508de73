"""Detection probe: how far the features of a checkpoint can take the detector.

The stride-16 input of one layer (`--layer`) is computed once for `--views` augmented copies
of every detection training image (train.py's flip, zoom and colour jitter) and kept in
memory. The layers above it, with the checkpoint's weights (or fresh ones with `--fresh`),
and a freshly initialised det head are then trained on those features with train.py's
detection loss, and scored on val with the metric eval.py uses. Nothing below the layer
learns or runs again, so an epoch costs a few seconds instead of a stage-2 epoch's 20-30 s.

    --layer shared_conv3   train shared conv 3 + the det head on what shared conv 2 gives:
                           about what stage 2 can do, whose earlier layers barely move
    --layer neck           train the neck, the three shared convs and the head on the
                           frozen backbone: a fully plastic trunk (add --fresh for one that
                           owes nothing to segmentation)

    python det_probe.py --weights runs/lite0/model_s1_best.pt --data_root DL_data --layer neck --fresh

Segmentation is not distilled here: the probe measures the detector alone, an upper bound
for the same schedule. Views are fixed, so many epochs over few views overfit sooner than
train.py, whose augmentation is new every epoch.
"""
import argparse
import math
import sys

import torch

from checkpoints import checkpoint_img_sizes
from datasets import DataError, build_dataset, collate, train_augmentation
from detection import decode, detection_loss
from eval import load_model
from metrics import DetectionMetric
from models import UnifiedMultiTaskModel, input_size, pick_device
from options import HelpWithDefaults, build_parser, scale_range
from train import autocast_dtype, set_seed, set_train_mode

TRUNK = ("neck", "shared_conv1", "shared_conv2", "shared_conv3")  # the layers above the backbone, in order


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--weights", required=True, help="a checkpoint written by train.py (e.g. model_s1_best.pt)")
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets")
    p.add_argument("--layer", default="shared_conv3", choices=TRUNK,
                   help="the lowest layer that learns; its input is cached")
    p.add_argument("--fresh", action="store_true", help="re-initialise the layers that learn instead of "
                                                        "starting from the checkpoint's weights")
    p.add_argument("--views", type=int, default=4, help="augmented copies of each training image")
    p.add_argument("--epochs", type=int, default=60, help="passes over the training images (one view each)")
    p.add_argument("--eval_every", type=int, default=10, help="epochs between two val (and train-view) scores")
    p.add_argument("--batch_size", type=int, default=32, help="cached views per step")
    p.add_argument("--lr", type=float, default=build_parser().get_default("lr_det"),
                   help="AdamW learning rate (train.py's --lr_det)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--img_size", type=input_size, help="input size (default: the checkpoint's detection size)")
    p.add_argument("--seed", type=int, default=0, help="the views' augmentation, the fresh layers, the shuffling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)
    for name in ("views", "epochs", "eval_every", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


@torch.no_grad()
def layer_inputs(model, images, layer, amp_dtype, batch_size=32):
    """The input of `layer` for uint8 images, computed by the frozen layers below it, in bf16."""
    chunks = []
    for start in range(0, len(images), batch_size):
        x = model.prepare_input(images[start:start + batch_size])
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if layer == "neck":
                x = torch.cat(model.backbone_taps(x), 1)
            else:
                x = model.feature_maps(x)[TRUNK[TRUNK.index(layer) - 1]]
        chunks.append(x.to(torch.bfloat16))
    return torch.cat(chunks)


def detector_above(model, layer, x):
    """The learned layers and the det head on cached inputs of `layer`."""
    for name in TRUNK[TRUNK.index(layer):]:
        x = getattr(model, name)(x)
    return model.det_head(x)


def cached_views(model, dataset, views, layer, amp_dtype, seed):
    """Inputs of `layer` and the targets of `views` augmented copies of every image, view-major."""
    features, targets = [], []
    for view in range(views):
        set_seed(seed * 1000 + view)  # each view its own augmentation, the same every run
        images, view_targets, _ = collate([dataset[i] for i in range(len(dataset))])
        features.append(layer_inputs(model, images, layer, amp_dtype))
        targets += view_targets
    return torch.cat(features), targets


@torch.no_grad()
def score(model, layer, features, targets, sizes, amp_dtype, batch_size=32):
    """DetectionMetric scores of the detector on cached features (boxes in original pixels when
    `sizes` is given, else in input pixels, as the targets are)."""
    metric = DetectionMetric()
    for start in range(0, len(features), batch_size):
        x = features[start:start + batch_size].float()
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            det = detector_above(model, layer, x)
        batch_sizes = sizes[start:start + batch_size] if sizes else None
        metric.update(decode(det.float(), batch_sizes), targets[start:start + batch_size])
    return metric.compute()


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, ckpt = load_model(args.weights, device)
        img_size = args.img_size or checkpoint_img_sizes(ckpt)["det"]
        jitter = scale_range(build_parser().get_default("det_scale_jitter"))  # train.py's augmentation
        train_set = build_dataset("det", args.data_root, "train", img_size,
                                  augment=train_augmentation("det", scale_jitter=jitter))
        val_set = build_dataset("det", args.data_root, "val", img_size, train=False)
    except (ValueError, DataError) as err:
        sys.exit(f"error: {err}")
    amp_dtype = autocast_dtype("auto", device)
    features, targets = cached_views(model, train_set, args.views, args.layer, amp_dtype, args.seed)
    val_features = layer_inputs(model, val_set.images_uint8(), args.layer, amp_dtype)
    val_targets = [val_set.eval_target(i) for i in range(len(val_set))]
    val_sizes = [val_set.original_size(i) for i in range(len(val_set))]

    # A fresh det head always (a stage-1 checkpoint has none trained); fresh layers with --fresh.
    set_seed(args.seed)
    fresh = UnifiedMultiTaskModel(ckpt["backbone"], pretrained=False).to(device)
    learned = list(TRUNK[TRUNK.index(args.layer):]) + ["det_head"]
    for name in learned:
        if args.fresh or name == "det_head":
            setattr(model, name, getattr(fresh, name))
    modules = torch.nn.ModuleList(getattr(model, name) for name in learned).requires_grad_(True)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    print(f"detection probe of {args.weights} (stage {ckpt.get('stage')}): learning {', '.join(learned)}"
          f"{' (fresh)' if args.fresh else ''} on {args.views} cached views of {len(train_set)} images at {img_size} px")

    generator = torch.Generator().manual_seed(args.seed)
    num_images, history = len(train_set), []
    for epoch in range(1, args.epochs + 1):
        # train.py's rule: BatchNorm statistics of layers trained for segmentation stay frozen
        set_train_mode(model, "det", [] if args.fresh else ["seg"])
        # one view of every image per epoch, in a random order
        picks = torch.randint(args.views, (num_images,), generator=generator) * num_images
        picks += torch.randperm(num_images, generator=generator)
        sums, steps = {}, 0
        for start in range(0, num_images, args.batch_size):
            batch = picks[start:start + args.batch_size]
            x = features[batch.to(features.device)].float()
            with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                det = detector_above(model, args.layer, x)
            batch_targets = [{k: v.to(device) for k, v in targets[i].items()} for i in batch.tolist()]
            loss, parts = detection_loss(det.float(), batch_targets)
            if not math.isfinite(loss.item()):  # before the step applies it
                sys.exit(f"error: non-finite detection loss at epoch {epoch}; try a lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in parts.items():
                sums[name] = sums.get(name, 0.0) + value.item()
            steps += 1
        if epoch % args.eval_every and epoch != args.epochs:
            continue
        model.eval()
        val = score(model, args.layer, val_features, val_targets, val_sizes, amp_dtype)
        seen = score(model, args.layer, features[:num_images], targets[:num_images], None, amp_dtype)
        history.append({"epoch": epoch, "losses": {k: v / steps for k, v in sums.items()}, "val": val,
                        "train_view": seen})
        by_size = " / ".join(f"{v:.3f}" if v is not None else "-" for v in val["recall50_class_agnostic_by_size"].values())
        print(f"epoch {epoch:3d} " + " ".join(f"{k} {v / steps:.3f}" for k, v in sums.items()) +
              f" | train-view mAP@0.5 {seen['mAP_50']:.4f} | val mAP@0.5 {val['mAP_50']:.4f}, class-agnostic AP "
              f"{val['AP50_class_agnostic']:.4f}, recall small / medium / large {by_size}")
    return history


if __name__ == "__main__":
    main()
