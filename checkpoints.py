"""What a run writes to --out_dir and reads back: stage checkpoints, the epoch log
(training_log.jsonl), and the state behind --resume and --start_from.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from options import describe_sizes, set_factor
from tasks import STAGES, TASKS

CHECKPOINT_NAMES = {1: "model_s1_best.pt", 2: "model_s2_best.pt", 3: "model_final_best_1pass.pt"}


def save_atomic(obj, path):
    """Write then rename: a crash mid-write never leaves a truncated checkpoint behind."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_log_record(out_dir, record):
    """One line of training_log.jsonl: an epoch's record, or the blend a stage kept instead
    (its "kept_blend" the share of the stage's weights, its "epoch" the epoch blended); the
    fields are filled in by train.run_stage."""
    with open(Path(out_dir) / "training_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def checkpoint_dict(model, args, class_names, baselines, stage, epoch, metrics):
    return {"model": model.state_dict(), "backbone": args.backbone, "img_sizes": dict(args.img_sizes),
            "class_names": class_names, "baselines": dict(baselines), "stage": stage, "epoch": epoch,
            "metrics": metrics, "args": vars(args)}


def read_checkpoint(path, flag):
    """The dict of a checkpoint train.py or joint.py wrote, or a one-line ValueError naming the flag
    that gave the file: missing, unreadable, last.pt (resume state, not a stage checkpoint), other."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{flag} {path}: file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{flag} {path}: not a readable checkpoint ({type(err).__name__})") from None
    if isinstance(ckpt, dict) and "model" in ckpt and "backbone" not in ckpt and "optimizer" in ckpt:
        raise ValueError(f"{flag} {path}: train.py's resume state (last.pt), not a stage checkpoint: continue "
                         "its run with --resume, or pass a stage checkpoint: model_s1_best.pt, model_s2_best.pt "
                         "or model_final_best_1pass.pt")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "backbone" not in ckpt:
        raise ValueError(f"{flag} {path}: expected a checkpoint written by train.py (a dict with 'model' and "
                         "'backbone')")
    return ckpt


def checkpoint_img_sizes(ckpt):
    """{task: input size} of a checkpoint (or of its saved args); one img_size for all tasks in
    checkpoints written before the sizes were per task."""
    return dict(ckpt["img_sizes"]) if ckpt.get("img_sizes") else dict.fromkeys(TASKS, ckpt["img_size"])


def refuse_to_overwrite(out_dir, names, hint):
    """A new run never overwrites the checkpoints or the log of an earlier one."""
    existing = [name for name in names if (out_dir / name).exists()]
    if existing:
        sys.exit(f"error: {out_dir / existing[0]} exists: --out_dir {out_dir} already holds a run; {hint}")


def start_from_checkpoint(path, out_dir, model, args):
    """Skip the stages a stage checkpoint already holds: its weights become the model (and the
    next stage's teacher), its baselines carry over."""
    ckpt = read_checkpoint(path, "--start_from")
    if ckpt.get("stage") not in CHECKPOINT_NAMES or ckpt["stage"] == len(STAGES):
        raise ValueError(f"--start_from {path}: holds stage {ckpt.get('stage')!r}, expected the checkpoint of "
                         f"a stage before the last ({', '.join(CHECKPOINT_NAMES[s] for s, _ in STAGES[:-1])})")
    # The stages it holds must have seen the same inputs; later tasks may change their size.
    done = [task for stage, task in STAGES if stage <= ckpt["stage"]]
    sizes = checkpoint_img_sizes(ckpt)
    if ckpt.get("backbone") != args.backbone or any(sizes[task] != args.img_sizes[task] for task in done):
        raise ValueError(f"--start_from {path}: trained with backbone {ckpt.get('backbone')} and "
                         f"{describe_sizes({task: sizes[task] for task in done})}; pass the same flags")
    model.load_state_dict(ckpt["model"])
    target = out_dir / CHECKPOINT_NAMES[ckpt["stage"]]
    if target.resolve() != path.resolve():
        shutil.copyfile(path, target)
    return {"baselines": ckpt["baselines"], "stage": ckpt["stage"] + 1}


# A resumed run may move (data, outputs, device) and run its stages longer; every other flag is
# part of the recipe and must be the first run's.
RESUME_MAY_CHANGE = {"data_root", "out_dir", "device", "workers", "epochs_seg", "epochs_det", "epochs_cls"}
# How this invocation starts (not the recipe), and what resume_state checks on its own: the backbone
# and input sizes, and the factor tables, as the values they become; --no-pretrained need not be
# repeated, the first run's is taken from last.pt.
NOT_COMPARED_FLAG_BY_FLAG = {"resume", "start_from", "stop_after_epochs", "demo", "pretrained", "backbone",
                             "img_size", "img_size_seg", "img_size_det", "img_size_cls", "img_sizes",
                             "lr_factor", "lr_factors"}
# What runs did before a flag existed, where the flag's default changed the recipe; a flag
# missing from an older run and not named here was added with the old behaviour as its default.
BEFORE_THE_FLAGS = {"lr_schedule": "plateau", "ema_decay": 0.0, "distill_seg_new_images": {2: 0.0, 3: 0.0},
                    "distill_det_new_images": 0.0, "distill_backbone_probe": 0.0, "blend_steps": 0}


def as_flag(flag, value):
    """How a saved argument reads on the command line, for resume's error message."""
    if isinstance(value, bool) or value is None:
        return f"with --{flag}" if value else f"without --{flag}"
    if isinstance(value, dict):  # --distill_seg_new_images: stage -> weight
        typed = " ".join(f"{v:g}" for v in value.values())
    elif isinstance(value, (tuple, list)):  # the scale jitters: LOW,HIGH
        typed = ",".join(f"{v:g}" for v in value)
    else:
        typed = f"{value:g}" if isinstance(value, float) else str(value)
    return f"with --{flag} {typed}"


def resume_state(out_dir, model, args):
    path = out_dir / "last.pt"
    if not path.exists():
        raise ValueError(f"--resume: {path} not found; start without --resume")
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved_args = state["args"]
    sizes = checkpoint_img_sizes(saved_args)
    if saved_args["backbone"] != args.backbone or sizes != args.img_sizes:
        raise ValueError(f"--resume: {path} was trained with backbone {saved_args['backbone']} and "
                         f"{describe_sizes(sizes)}; pass the same flags")
    for stage, table in saved_args["lr_factors"].items():  # a changed factor (or default) would switch recipe too
        saved = {}
        for module, factor in table.items():  # a run saved before session 26 has one backbone factor
            set_factor(saved, module, factor)
        for module, factor in saved.items():
            if args.lr_factors[int(stage)].get(module) != factor:
                raise ValueError(f"--resume: {path} was trained with --lr_factor {stage} {module} {factor:g}; "
                                 "pass the same flag")
    not_compared = RESUME_MAY_CHANGE | NOT_COMPARED_FLAG_BY_FLAG
    for flag, value in vars(args).items():
        if flag not in not_compared:
            saved = saved_args.get(flag, BEFORE_THE_FLAGS.get(flag, value))
            if isinstance(value, dict) and not isinstance(saved, dict):  # saved before the flag was per stage
                saved = dict.fromkeys(value, saved)
            if saved != value:
                raise ValueError(f"--resume: {path} was trained {as_flag(flag, saved)}; pass the same flags")
    model.load_state_dict(state.pop("model"))
    args.pretrained = saved_args.get("pretrained", True)  # whether stage 1 keeps ImageNet's BN statistics
    state.pop("args")
    state.pop("epochs_this_run", None)  # counts this invocation's epochs only (--stop_after_epochs)
    return state
