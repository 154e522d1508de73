"""Joint-training reference: the tasks trained together, for comparison with train.py.

Every step takes one batch of each task and sums the task losses; nothing is distilled
and nothing needs preserving, so every layer learns with train.py's stage-1
learning-rate factors (--lr_factor 1 MODULE VALUE overrides one). Same budget as the
sequential pass: by default (epochs_seg + epochs_det + epochs_cls) / 3 joint epochs, each
of which sees every task's training set once, so both see the same number of labelled
training images (replay images not counted). The kept epoch is the one with the best
mean of the tasks' scores.

`--tasks det` (or any subset) trains only those tasks: with one task it is the single-task
reference, the score that task reaches when nothing else shares the network (budget: the
mean of the listed tasks' --epochs_*, so a task's own stage length when it is alone).

    python joint.py --data_root DL_data --backbone efficientnet_lite0 --out_dir runs/joint
    python eval.py --weights runs/joint/model_joint_best.pt --data_root DL_data --tasks all

Takes every flag of train.py that applies (img_size, batch_size, first-stage factors,
det_scale_jitter, seed, device, amp, ...); the learning rate is the first listed task's
(--lr_seg by default). train.py's flags of replay, distillation, checkpoint selection,
resuming, the demo and --baseline_mode are not flags here (for demo data: python
datasets.py --make-demo DIR, then --data_root DIR); a stage-2/3 --lr_factor or another
task's --lr_* stops it with an error instead of being ignored. Outputs in --out_dir:
model_joint_best.pt and joint_log.jsonl (one JSON object per epoch; python plot_log.py
--log OUT_DIR/joint_log.jsonl draws it).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoints
import options
import train
from datasets import DataError, make_loader
from models import PretrainedWeightsError, pick_device
from tasks import PRIMARY_METRIC, TASKS

CHECKPOINT_NAME = "model_joint_best.pt"


def task_list(text):
    """'seg,det' -> ['seg', 'det'] in the order of the single pass; 'all' -> every task."""
    names = TASKS if text == "all" else text.split(",")
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma-separated subset of {','.join(TASKS)}, "
                                         f"got {text!r}")
    return [task for task in TASKS if task in names]


def parse_args(argv=None):
    # without train.py's replay, distillation, resume, demo and baseline flags: unknown here, not ignored
    parser = options.build_parser(__doc__.split("\n\n")[0], sequential=False)
    parser.add_argument("--tasks", type=task_list, default="all",
                        help="tasks trained together: 'all' or a subset such as 'det' (a single-task reference)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="joint epochs (default: the mean of the listed tasks' --epochs_*, the same budget)")
    args = options.parse_args(argv, parser)
    unused = [f"--lr_{task}" for task in TASKS
              if task != args.tasks[0] and getattr(args, f"lr_{task}") != parser.get_default(f"lr_{task}")]
    unused += [f"--lr_factor {stage} {module} {value}" for stage, module, value in args.lr_factor if stage != "1"]
    if unused:
        parser.error(f"{', '.join(unused)}: not used by a joint run, which learns at --lr_{args.tasks[0]} with the "
                     f"stage-1 factors")
    if args.epochs is None:
        args.epochs = round(sum(getattr(args, f"epochs_{task}") for task in args.tasks) / len(args.tasks))
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Unlike train.py, no train.keep_freed_memory(): a joint step allocates at three input sizes and
    # the kept blocks grew a run's peak from 9.7 to 13.0 GiB over five epochs (even with malloc_trim
    # after each), for 1.2x in epoch 1 and no gain by epoch 3; glibc's own limits held three epochs
    # under 9.1 GiB (RESULTS.md, Memory)
    out_dir = Path(args.out_dir)
    checkpoints.refuse_to_overwrite(out_dir, [CHECKPOINT_NAME, "joint_log.jsonl"], "choose another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        device = pick_device(args.device)
        train.set_seed(args.seed)
        data = train.load_data(args, tasks=args.tasks)  # only the listed tasks' folders are needed
        model = train.build_model(args, device)
    except (DataError, PretrainedWeightsError, ValueError) as err:
        sys.exit(f"error: {err}")

    tasks, lr = args.tasks, getattr(args, f"lr_{args.tasks[0]}")
    optimizer = torch.optim.AdamW(train.parameter_groups(model, tasks, [], args.lr_factors[1], lr),
                                  weight_decay=args.weight_decay)
    scheduler = train.make_scheduler(optimizer, args, args.epochs)
    amp_dtype = train.autocast_dtype(args.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    weight_average = train.make_weight_average(model, args.ema_decay)
    scored = model if weight_average is None else weight_average.module  # validated and kept
    print(f"joint training of {', '.join(tasks)} for {args.epochs} epochs, backbone {args.backbone}, "
          f"{options.describe_sizes(args.img_sizes)}, device {device}")

    best_score = None
    for epoch in range(1, args.epochs + 1):
        started = time.time()
        train.set_seed(args.seed + epoch)
        train.set_train_mode(model, None, [], imagenet_statistics=args.pretrained)
        loaders = [make_loader(data["train"][task], args.batch_size, shuffle=True, workers=args.workers,
                               pin_memory=device.type == "cuda", seed=args.seed + 1000 * k + epoch)
                   for k, task in enumerate(tasks)]
        # zip stops at the shortest loader; the three training sets have 240 images each here
        steps = tqdm(zip(*loaders), total=min(len(loader) for loader in loaders), desc=f"joint {epoch}/{args.epochs}",
                     leave=False, disable=None)
        batches = (dict(zip(tasks, step)) for step in steps)
        try:
            losses = train.train_one_epoch(model, batches, {}, optimizer, scaler, args, device, amp_dtype,
                                           weight_average)
        except train.NonFiniteLossError as err:
            sys.exit(f"error: {err}: training stopped; {out_dir / CHECKPOINT_NAME} (if written) is intact")
        metrics = train.validate(scored, data["val"], tasks, args)
        score = sum(metrics[PRIMARY_METRIC[task]] for task in tasks) / len(tasks)
        lr = train.head_lr(optimizer, tasks[0])  # every head learns at the same rate here
        train.step_scheduler(scheduler, score)
        is_best = best_score is None or score > best_score
        if is_best:
            best_score = score
            checkpoint = checkpoints.checkpoint_dict(scored, args, data["class_names"], {}, "joint", epoch, metrics)
            checkpoints.save_atomic(checkpoint, out_dir / CHECKPOINT_NAME)
        record = {"task": "joint", "tasks": tasks, "epoch": epoch, "epochs": args.epochs, "lr": lr, "losses": losses,
                  **metrics, "mean_score": score, "best": is_best, "time_s": round(time.time() - started, 2)}
        with open(out_dir / "joint_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shown = " ".join(f"{PRIMARY_METRIC[task]}={metrics[PRIMARY_METRIC[task]]:.4f}" for task in tasks)
        print(f"joint epoch {epoch}/{args.epochs} loss {losses['total']:.4f} {shown}"
              f"{' *best*' if is_best else ''} ({record['time_s']:.1f}s)")
    print(f"kept model (best mean score {best_score:.4f}): {out_dir / CHECKPOINT_NAME}")


if __name__ == "__main__":
    main()
