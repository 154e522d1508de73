"""Evaluate a checkpoint on the val sets and report forgetting against the stage baselines.

    python eval.py --weights model_final_best_1pass.pt --data_root DL_data --tasks all \
        [--base_miou X --base_map Y --base_top1 Z] [--json results.json] [--save_vis vis/] \
        [--blend_with model_s2_best.pt --blend 0.8]

    mIoU     VOC definition: 21 classes with background, 255 ignored, original mask size
    mAP_50   COCO AP at IoU 0.5 over the 10 classes (pycocotools), crowd boxes ignored
    top1     Top-1 accuracy over the 10 Imagenette classes
    drop %   (baseline - final) / baseline * 100; MET when drop <= 5

Baselines default to the ones training wrote into the checkpoint; flags override them.
`--split train` scores the training images instead (no augmentation), to tell a model that
underfits from one that overfits; it shows no drops, as the baselines are val scores.
"""
import argparse
import json
import sys
from pathlib import Path

from checkpoints import checkpoint_img_sizes, read_checkpoint
from datasets import DataError, build_dataset
from metrics import evaluate
from models import UnifiedMultiTaskModel, blend_toward_teacher, input_size, pick_device
from options import HelpWithDefaults, describe_sizes
from tasks import MAX_DROP_PERCENT, PRIMARY_METRIC, STAGES, TASKS, drop_percent

BASELINE_FLAGS = {"seg": "base_miou", "det": "base_map", "cls": "base_top1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--weights", required=True, help="a checkpoint written by train.py or joint.py")
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets")
    p.add_argument("--tasks", default="all", help="all, or a comma list of seg, det, cls")
    p.add_argument("--base_miou", type=float, help="segmentation baseline (default: from the checkpoint)")
    p.add_argument("--base_map", type=float, help="detection baseline (default: from the checkpoint)")
    p.add_argument("--base_top1", type=float, help="classification baseline (default: from the checkpoint)")
    p.add_argument("--split", default="val", choices=("val", "train"),
                   help="the images scored; train shows no baselines or drops (those are val scores)")
    p.add_argument("--batch_size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--img_size", type=input_size, help="input size of every task (default: each task's size in the checkpoint)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="also print a 95%% interval of each score from N resamples of the scored images "
                        "(--split; e.g. 200)")
    p.add_argument("--blend_with", metavar="CKPT",
                   help="score a blend of --weights with this earlier checkpoint (e.g. the stage before), as "
                        "train.py --blend_steps tries them; needs --blend")
    p.add_argument("--blend", type=float, metavar="ALPHA",
                   help="with --blend_with: ALPHA x --weights + (1 - ALPHA) x CKPT, the --weights stage's own "
                        "head unblended")
    p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    p.add_argument("--save_vis", metavar="DIR", help="write a few prediction pictures per task")
    p.add_argument("--num_vis", type=int, default=4, help="pictures per task with --save_vis")
    args = p.parse_args(argv)
    tasks = TASKS if args.tasks == "all" else tuple(t.strip() for t in args.tasks.split(","))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        p.error(f"--tasks: unknown task(s) {unknown}; expected 'all' or a comma list of seg, det, cls")
    args.tasks = tasks
    if args.split == "train" and any(getattr(args, flag) is not None for flag in BASELINE_FLAGS.values()):
        p.error("--base_miou/--base_map/--base_top1 are val scores; they do not apply with --split train")
    if (args.blend_with is None) != (args.blend is None) or not 0 <= (args.blend or 0) <= 1:
        p.error("--blend_with CKPT and --blend ALPHA go together, ALPHA in [0, 1]")
    if args.bootstrap < 0:
        p.error(f"--bootstrap must be 0 (off) or a number of resamples, got {args.bootstrap}")
    if args.num_vis < 1:
        p.error(f"--num_vis must be at least 1, got {args.num_vis}")
    if args.save_vis and Path(args.save_vis).exists() and not Path(args.save_vis).is_dir():
        p.error(f"--save_vis {args.save_vis}: a file; expected a folder for the pictures")
    return args


def load_model(path, device, flag="--weights"):
    """(model, checkpoint dict) or a one-line error naming the file (and the flag that gave it)."""
    ckpt = read_checkpoint(path, flag)
    model = UnifiedMultiTaskModel(ckpt["backbone"], pretrained=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ValueError(f"{flag} {path}: does not match UnifiedMultiTaskModel({ckpt['backbone']}): {first}") from None
    return model.to(device).use_channels_last().eval(), ckpt


def blend_with(model, ckpt, path, alpha, device):
    """--blend_with/--blend: load into `model` the blend train.py's --blend_steps would try of the
    checkpoint (`ckpt`, already in `model`) with the earlier checkpoint at `path`; returns `ckpt`
    marked with the blend, without its own task's baseline (the unblended model's score; train.py
    makes a kept blend's own score the baseline)."""
    earlier_model, earlier = load_model(path, device, flag="--blend_with")
    stages = earlier.get("stage"), ckpt.get("stage")  # joint.py's checkpoints have stage "joint"
    if earlier["backbone"] != ckpt["backbone"] or not all(isinstance(s, int) for s in stages) or stages[0] >= stages[1]:
        raise ValueError(f"--blend_with {path}: expected train.py stage checkpoints, this one of an earlier stage "
                         f"than --weights (stage {stages[1]}) and of the same backbone ({ckpt['backbone']})")
    primary = dict(STAGES)[ckpt["stage"]]
    model.load_state_dict(blend_toward_teacher(model.state_dict(), earlier_model.state_dict(), alpha, primary))
    baselines = {m: v for m, v in ckpt.get("baselines", {}).items() if m != PRIMARY_METRIC[primary]}
    return {**ckpt, "baselines": baselines, "blend": alpha}


def main(argv=None):
    args = parse_args(argv)
    try:
        device = pick_device(args.device)
        model, ckpt = load_model(args.weights, device)
        if args.blend_with:
            ckpt = blend_with(model, ckpt, args.blend_with, args.blend, device)
        trained_img_sizes = checkpoint_img_sizes(ckpt)
        img_sizes = dict.fromkeys(TASKS, args.img_size) if args.img_size else trained_img_sizes
        datasets = {t: build_dataset(t, args.data_root, args.split, img_sizes[t], train=False) for t in args.tasks}
    except (ValueError, DataError) as err:
        sys.exit(f"error: {err}")

    baselines = dict(ckpt.get("baselines", {})) if args.split == "val" else {}
    for task, flag in BASELINE_FLAGS.items():
        if getattr(args, flag) is not None:
            baselines[PRIMARY_METRIC[task]] = getattr(args, flag)

    report = {"metrics": {}, "baselines": {}, "drops": {}, "met": {}, "backbone": ckpt["backbone"],
              "img_sizes": {t: img_sizes[t] for t in args.tasks}, "weights": str(args.weights), "split": args.split, "details": {},
              "trained_img_sizes": {t: trained_img_sizes[t] for t in args.tasks},
              "class_names": ckpt.get("class_names", {}), "blend": ckpt.get("blend")}
    for task in args.tasks:
        scores = evaluate(model, datasets[task], task, batch_size=args.batch_size, bootstrap=args.bootstrap)
        name = PRIMARY_METRIC[task]
        report["metrics"][name] = scores.pop(name)
        report["details"].update(scores)
        if name in baselines:
            report["baselines"][name] = baselines[name]
            report["drops"][name] = drop_percent(baselines[name], report["metrics"][name])
            report["met"][name] = report["drops"][name] <= MAX_DROP_PERCENT

    print_table(report, args.tasks)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    if args.save_vis:
        from visualize import save_visualizations

        for task in args.tasks:
            for path in save_visualizations(model, datasets[task], task, args.save_vis, args.num_vis):
                print(f"wrote {path}")
    return report


def named_scores(pairs):
    """'name 0.123, other -' from (name, score or None) pairs; None where there is no ground truth."""
    return ", ".join(f"{name} {'-' if score is None else f'{score:.3f}'}" for name, score in pairs)


def print_table(report, tasks):
    print(f"backbone {report['backbone']}, {describe_sizes(report['img_sizes'])}, weights {report['weights']}, "
          f"{report['split']} images")
    if report["baselines"] and report["img_sizes"] != report["trained_img_sizes"]:
        print(f"note: the baselines were measured at the training sizes "
              f"({describe_sizes(report['trained_img_sizes'])}), not at these")
    if report.get("blend") is not None:
        print(f"weights: blended {report['blend']:g} with an earlier stage's (train.py --blend_steps, "
              "eval.py --blend_with)")
    details = report["details"]
    print(f"{'task':<5} {'metric':<7} {'baseline':>9} {'final':>8} {'drop %':>8}  result")
    for task in tasks:
        name = PRIMARY_METRIC[task]
        final = report["metrics"][name]
        if name in report["baselines"]:
            verdict = "MET" if report["met"][name] else "NOT MET"
            row = (f"{task:<5} {name:<7} {report['baselines'][name]:>9.4f} {final:>8.4f} "
                   f"{report['drops'][name]:>8.2f}  {verdict}")
        else:
            row = f"{task:<5} {name:<7} {'-':>9} {final:>8.4f} {'-':>8}  (no baseline)"
        if f"{name}_ci95" in details:
            low, high = details[f"{name}_ci95"]
            row += f"  (final 95% bootstrap interval {low:.4f}-{high:.4f})"
        print(row)
    if details.get("mIoU_fg") is not None:
        print(f"seg   mIoU over the 20 foreground classes, background pixels ignored (the reference README's "
              f"variant): {details['mIoU_fg']:.4f}")
    if "AP50_per_class" in details:
        names = report["class_names"].get("det") or [str(k) for k in range(len(details["AP50_per_class"]))]
        shown = named_scores(zip(names, details["AP50_per_class"]))
        print(f"det   AP50 per class (- = no ground truth): {shown}")
        by_size = named_scores(details["recall50_class_agnostic_by_size"].items())
        print(f"det   class-agnostic (every box counted as one class): AP50 {details['AP50_class_agnostic']:.4f}, "
              f"recall@0.5 {details['recall50_class_agnostic']:.4f} (by COCO size range: {by_size})")


if __name__ == "__main__":
    main()
