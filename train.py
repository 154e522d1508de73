"""Sequential multi-task training: segmentation -> detection -> classification, one pass.

Each stage trains one primary task. From stage 2 on, a frozen copy of the model after the
previous stage is the teacher, and replay batches from the earlier tasks' training sets
are distilled (LwF): seg KL, det output + shared-feature MSE, cls KL, and seg KL on the
new task's own images too (--distill_seg_new_images; in stage 3 det output MSE as well,
--distill_det_new_images). Stage 3 also distils the classification output toward a linear
probe of the teacher's backbone (--distill_backbone_probe; --backbone_probe imagenet: toward
the backbone's own ImageNet classifier instead). Layers shared with
earlier tasks learn slowly (a factor table of learning rates; the last shared conv, which
distillation holds, at the full rate) and keep their BatchNorm
statistics frozen, so old tasks are not quietly re-normalised. What is validated, kept
and passed on is an exponential moving average of the weights (--ema_decay).

    python train.py --demo                                   # everything on generated data
    python train.py --data_root DL_data --backbone efficientnet_lite0

Outputs in --out_dir: model_s1_best.pt, model_s2_best.pt, model_final_best_1pass.pt,
training_log_single_pass.txt (human), training_log.jsonl (one JSON object per epoch, and one per kept blend),
last.pt (for --resume).

The flags and the tables behind their defaults (each module's learning-rate factor per stage,
input sizes, distillation weights) are in options.py; what a run writes and reads back
(checkpoints, the log, --resume, --start_from) in checkpoints.py.
"""
import contextlib
import copy
import ctypes
import functools
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from checkpoints import (CHECKPOINT_NAMES, append_log_record, checkpoint_dict, refuse_to_overwrite,
                         resume_state, save_atomic, start_from_checkpoint)
from datasets import (DataError, build_dataset, classification_batch_mixing, make_loader,
                      train_augmentation)
from losses import distillation_loss, kl_with_temperature, task_loss
from metrics import evaluate
from models import (PretrainedWeightsError, UnifiedMultiTaskModel, blend_toward_teacher, count_trainable_parameters,
                    imagenet_classifier, imagenet_rows, pick_device)
from options import REFERENCE_BACKBONE_FACTOR, build_parser, describe_sizes, parse_args, set_factor
from replay import ReplayBank
from tasks import PRIMARY_METRIC, STAGES, TASKS, within_max_drop


# ----------------------------------------------------------------------------- helpers
def set_seed(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(amp, device):
    """auto: bf16 on GPUs that have it (else fp16 with a grad scaler); on a CPU, bf16 only where
    it has native bf16 instructions (AVX512-BF16 or AMX), else float32."""
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        return torch.bfloat16 if native else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def keep_freed_memory(enabled=True):
    """Linux/glibc: keep freed memory in the process instead of handing every block over 32 MiB
    back to the OS, which made each CPU step page-fault its activations in again (a 320-px
    training epoch ran 1.13-1.18x faster with this on a 2-core CPU; bench.py, RESULTS.md). Speed
    only, results are unchanged. `enabled=False` (for bench.py) sets the ceilings glibc's own
    dynamic thresholds grow to on 64-bit (mmap 32 MiB, trim 64 MiB, no top pad); a fresh process
    starts lower, but once mallopt sets a value glibc no longer adjusts it, so this is as close
    as a running process gets.
    Returns whether glibc took all three settings; False (nothing changed) where the C library
    is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, Windows, musl: nothing to tune
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # mallopt parameters from <malloc.h>
    mmap_threshold, trim_threshold, top_pad = (1 << 30, 1 << 30, 256 << 20) if enabled else (32 << 20, 64 << 20, 0)
    taken = [libc.mallopt(m_mmap_threshold, mmap_threshold), libc.mallopt(m_trim_threshold, trim_threshold),
             libc.mallopt(m_top_pad, top_pad)]
    return all(taken)  # mallopt returns 1 on success, 0 for a value it refuses


def parameter_groups(model, primaries, learned, factors, base_lr):
    """AdamW groups from the factor table; every trainable parameter lands in exactly one group.

    Heads: the primary tasks' (one in a sequential stage, every task of joint.py --tasks) get
    `task_head`, heads of earlier (distilled) tasks get `distill_head`, heads of tasks not
    learned yet get 0. A module whose factor is 0 is
    frozen (requires_grad off), so autograd skips it: with the backbone frozen in stage 2 a
    CPU training step is about 3x faster, and a frozen backbone cannot forget. The backbone is
    two modules, up to stride 16 (what the neck taps) and the stride-32 blocks, so stage 3 can
    let the cheap, low-resolution part learn alone."""
    def head_factor(task):
        if task in primaries:
            return factors["task_head"]
        return factors["distill_head"] if task in learned else 0.0

    modules = {"backbone_early": (model.backbone.to_s16, factors["backbone_early"]),
               "backbone_late": (model.backbone.to_s32, factors["backbone_late"]),
               "neck": (model.neck, factors["neck"]),
               "shared_early": (model.shared_conv1, factors["shared_early"]),
               "shared_mid": (model.shared_conv2, factors["shared_mid"]),
               "shared_late": (model.shared_conv3, factors["shared_late"])}
    for task in TASKS:
        modules[f"{task}_head"] = (getattr(model, f"{task}_head"), head_factor(task))
    groups = []
    for name, (module, factor) in modules.items():
        module.requires_grad_(factor > 0)
        if factor > 0:
            groups.append({"name": name, "params": list(module.parameters()), "lr": base_lr * factor,
                           "factor": factor})
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)) and set(grouped) == set(trainable), "parameter groups overlap"
    return groups


def set_train_mode(model, primary, learned, imagenet_statistics=True):
    """Train mode, but BatchNorm statistics stay frozen where they serve a task already learned:
    the backbone's from the start when they are ImageNet's (a --no-pretrained backbone,
    imagenet_statistics=False, learns its own in stage 1), every shared layer once stage 1 is over."""
    model.train()
    frozen = [model.backbone] if imagenet_statistics or learned else []
    if learned:
        frozen += [model.neck, model.shared_conv1, model.shared_conv2, model.shared_conv3]
        frozen += [getattr(model, f"{t}_head") for t in TASKS if t != primary]
    for module in frozen:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


@contextlib.contextmanager
def batchnorm_statistics_frozen(model):
    """Replay images belong to other tasks: they must not move the running statistics of the
    primary head's BatchNorm (the only BatchNorm still learning from stage 2 on)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


def move_targets(targets, device):
    if isinstance(targets, torch.Tensor):
        return targets.to(device, non_blocking=True)
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]



def selection_key(metrics, primary, baselines, recent_scores=None):
    """Stage's own metric, but an epoch that kept every earlier task within 5% always wins.

    With `recent_scores` (the own metric of this and the previous epochs) the own metric is
    their mean, so one lucky epoch on 60 images does not become the stage's checkpoint and
    a baseline that later stages cannot get back to (--select_window)."""
    kept = within_max_drop(metrics, baselines)
    own = sum(recent_scores) / len(recent_scores) if recent_scores else metrics[PRIMARY_METRIC[primary]]
    return (kept, own)


class NonFiniteLossError(RuntimeError):
    pass


def setup_logging(out_dir):
    logger = logging.getLogger("train")
    for handler in logger.handlers:  # an earlier run in this process (tests, bench.py --pipeline)
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    file_handler = logging.FileHandler(out_dir / "training_log_single_pass.txt")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(file_handler)
    logger.addHandler(logging.StreamHandler(sys.stdout))
    return logger


# ----------------------------------------------------------------------------- one stage
def new_images_terms(outputs, teacher_outputs, seg_weight, det_weight, backbone_probe, args):
    """The earlier tasks, and the backbone's probe, distilled on the new task's own batch (what is
    on: new_images_distillation), as (log name, weighted loss) pairs: segmentation's KL,
    detection's output MSE (not the feature MSE), the classification output's KL toward the
    probe's logits on the teacher's pooled backbone features."""
    terms = []
    if seg_weight > 0:
        seg_loss, _ = distillation_loss("seg", outputs, teacher_outputs, {"seg": seg_weight}, args.distill_temp)
        terms.append(("distill_seg_new", seg_loss))
    if det_weight > 0:
        det_loss, _ = distillation_loss("det", outputs, teacher_outputs, {"det_logits": det_weight, "det_feature": 0.0},
                                        args.distill_temp)
        terms.append(("distill_det_new", det_loss))
    if backbone_probe is not None:
        probe_logits = backbone_probe(teacher_outputs["backbone_pooled"])
        probe_loss = kl_with_temperature(outputs["cls"], probe_logits, args.distill_temp)
        terms.append(("distill_probe", args.distill_backbone_probe * probe_loss))
    return terms


def train_one_epoch(model, batches, replay_banks, optimizer, scaler, args, device, amp_dtype, weight_average=None,
                    teacher=None, seg_new_images_weight=0.0, det_new_images_weight=0.0, backbone_probe=None,
                    replay_batch_size=None):
    """One optimiser step per item of `batches`, a dict {task: (images, targets, indices)}: the
    primary task's batch in a sequential stage (plus `replay_batch_size` replayed images of each
    earlier task), one batch of every task in joint training. `weight_average`
    (make_weight_average) is updated after every step. With a `teacher` (the previous stage's frozen model) and a
    `seg_new_images_weight` > 0, segmentation is distilled on the primary batches' images too
    (detection likewise with `det_new_images_weight` > 0), and with a `backbone_probe`
    (fit_backbone_probe or imagenet_backbone_probe) the classification output is distilled toward
    its logits.

    Each loss is backpropagated as soon as it is computed and the gradients add up before the
    step: the same step as one backward of the summed loss, but only one task's graph is held
    at a time (the first joint.py epoch at the default sizes: 8.8 GiB peak instead of 12.8 GiB;
    RESULTS.md)."""
    weights = {"seg": args.distill_weight_seg, "det_logits": args.distill_weight_det_logits,
               "det_feature": args.distill_weight_det_feature, "cls": args.distill_weight_cls} if replay_banks else {}
    loss_options = {"seg": {"dice_weight": args.seg_dice_weight},
                    "det": {"mode": args.det_assign, "objectness": args.det_objectness},
                    "cls": {"label_smoothing": args.label_smoothing}}
    cls_mixing = classification_batch_mixing(args.cls_mixup, args.cls_cutmix, model.cls_head.out_features)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    sums, steps = {}, 0
    for step_batches in batches:
        optimizer.zero_grad(set_to_none=True)
        total, parts = 0.0, {}
        for task, (images, targets, _) in step_batches.items():
            inputs, targets = model.prepare_input(images), move_targets(targets, device)
            if task == "cls" and cls_mixing is not None:
                inputs, targets = cls_mixing(inputs, targets)
            with autocast():
                outputs = model(inputs)
                loss, loss_parts = task_loss(task, outputs, targets, loss_options[task])
                if teacher is not None and (seg_new_images_weight > 0 or det_new_images_weight > 0
                                            or backbone_probe is not None):
                    with torch.no_grad():
                        teacher_outputs = teacher(inputs)
                    for name, term in new_images_terms(outputs, teacher_outputs, seg_new_images_weight,
                                                       det_new_images_weight, backbone_probe, args):
                        loss, loss_parts = loss + term, {**loss_parts, name: term.detach()}
            scaler.scale(loss).backward()
            total = total + loss.detach()
            parts.update(loss_parts)
        for task, bank in replay_banks.items():
            replay_images, teacher_outputs = bank.sample(replay_batch_size)
            with autocast(), batchnorm_statistics_frozen(model):
                student_outputs = model(model.prepare_input(replay_images))
                loss, loss_parts = distillation_loss(task, student_outputs, teacher_outputs, weights,
                                                     args.distill_temp)
            scaler.scale(loss).backward()
            total = total + loss.detach()
            parts.update(loss_parts)
        scaler.step(optimizer)
        scaler.update()
        if weight_average is not None:
            weight_average.update_parameters(model)
        # Sums stay on the device: no host sync per step, one at the end of the epoch.
        parts["total"] = total
        for name, value in parts.items():
            sums[name] = sums.get(name, 0.0) + value.float()
        steps += 1
    losses = {name: (value / steps).item() for name, value in sums.items()}
    if not all(math.isfinite(v) for v in losses.values()):
        raise NonFiniteLossError(f"non-finite training loss {losses}")
    return losses


def fit_backbone_probe(teacher, dataset, amp_dtype, log):
    """A linear probe of the teacher's pooled stride-32 backbone features on the classification
    training images (each plain and flipped, as a replay bank holds them): the backbone separates
    the classes far better than the shared convs do (probe.py), so its probe can teach the
    classification output."""
    # not at the top: probe.py imports eval.py, which imports train.py
    from probe import PROBE_WEIGHT_DECAY, fit_linear_probe

    bank = ReplayBank(dataset, teacher, torch.Generator(), amp_dtype=amp_dtype, keys=("backbone_pooled",))
    features = bank.teacher_outputs["backbone_pooled"].flatten(0, 1)  # (N, 2, 1280) -> (2N, 1280), on the device
    labels = torch.tensor([dataset.eval_target(i) for i in range(len(dataset))], device=features.device)
    labels = labels.repeat_interleave(2)
    probe = fit_linear_probe(features, labels, len(dataset.class_names), weight_decay=PROBE_WEIGHT_DECAY)
    accuracy = (probe(features).argmax(1) == labels).float().mean().item()
    log.info(f"backbone probe fitted on {len(labels)} classification views: train Top-1 {accuracy:.4f}")
    return probe


def imagenet_backbone_probe(backbone, dataset, device, log):
    """--backbone_probe imagenet: the pretrained backbone's ImageNet classifier, its rows for the
    dataset's classes, as a function of the teacher's pooled backbone features -> logits. It learned
    these classes from far more images than the 240 a fitted probe sees (models.imagenet_classifier)."""
    weight, bias = (t.to(device) for t in imagenet_classifier(backbone, dataset.wnids))
    log.info(f"backbone probe: the ImageNet classifier of {backbone}, rows of {len(dataset.wnids)} classes")
    return lambda pooled: pooled.float() @ weight.T + bias


def scores_line(metrics):
    """The scalar val scores of `metrics` as one log line: mIoU=0.5123 mAP_50=0.0612 ..."""
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def blend_until_within(model, teacher, primary, baselines, steps, score, log):
    """--blend_steps: the kept weights (in `model`) lost an earlier task by more than 5% in every
    epoch. Try them blended back toward the teacher, (steps-1)/steps of the new weights first,
    then less; return (alpha, metrics) of the first blend that keeps every earlier task within
    5% (`score(model)` gives the val metrics), `model` holding it, or None with `model` back to
    the kept weights. Each step back gives up some of the new task for the earlier ones; the
    first blend that holds them gives up the least (RESULTS.md, session 31)."""
    kept = copy.deepcopy(model.state_dict())
    teacher_weights = teacher.state_dict()
    log.info("no epoch kept every earlier task within 5%: blending the kept weights back toward the teacher's")
    for share in range(steps - 1, 0, -1):
        alpha = share / steps
        model.load_state_dict(blend_toward_teacher(kept, teacher_weights, alpha, primary))
        metrics = score(model)
        log.info(f"  blend {alpha:g}: {scores_line(metrics)}")
        if within_max_drop(metrics, baselines):
            return alpha, metrics
    model.load_state_dict(kept)
    log.info("  no blend kept every earlier task within 5%: the kept epoch's weights stay")
    return None


def new_images_distillation(args, stage, primary, learned, teacher, train_sets, amp_dtype, log):
    """What the stage distils on its new task's own images, as train_one_epoch's keyword
    arguments: the weights of segmentation's and detection's terms (--distill_seg_new_images,
    --distill_det_new_images; 0 for a task not learned before the stage) and, in the
    classification stage, the backbone probe (--distill_backbone_probe), fitted here, or with
    --backbone_probe imagenet the backbone's own ImageNet classifier."""
    backbone_probe = None
    if primary == "cls" and teacher is not None and args.distill_backbone_probe > 0:
        if args.backbone_probe == "imagenet":
            backbone_probe = imagenet_backbone_probe(args.backbone, train_sets["cls"], teacher.mean.device, log)
        else:
            backbone_probe = fit_backbone_probe(teacher, train_sets["cls"], amp_dtype, log)
    return {"seg_new_images_weight": args.distill_seg_new_images[stage] if "seg" in learned else 0.0,
            "det_new_images_weight": args.distill_det_new_images if "det" in learned else 0.0,
            "backbone_probe": backbone_probe}


def make_weight_average(model, decay):
    """--ema_decay: an exponential moving average of the weights and BatchNorm statistics
    (torch.optim.swa_utils.AveragedModel), or None when the decay is 0. Each stage starts a new
    one from the weights it begins with: in stages 2-3 the previous stage's model, which the
    average lets go of at the rate `decay` per step."""
    if decay == 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def make_scheduler(optimizer, args, epochs):
    """The per-epoch LR schedule of --lr_schedule; step it with step_scheduler."""
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                      patience=args.plateau_patience)


def head_lr(optimizer, task):
    """The learning rate of `task`'s head this epoch (the LR the log and plot_log.py show)."""
    return next((group["lr"] for group in optimizer.param_groups if group["name"] == f"{task}_head"), 0.0)


def step_scheduler(scheduler, score):
    """End of an epoch: the plateau schedule needs the epoch's score, cosine only counts epochs."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(score)
    else:
        scheduler.step()


def validate(model, val_sets, tasks, args):
    metrics = {}
    for task in tasks:
        metrics.update(evaluate(model, val_sets[task], task))
    return metrics


def run_stage(stage, primary, model, data, state, args, device, log):
    """Train `primary`, distilling every task learned before it; returns when the stage's best
    checkpoint is loaded back into `model` and its baseline recorded in `state`."""
    out_dir = Path(args.out_dir)
    learned = [task for _, task in STAGES[:stage - 1]]
    seen = learned + [primary]
    epochs = getattr(args, f"epochs_{primary}")
    base_lr = getattr(args, f"lr_{primary}")
    amp_dtype = autocast_dtype(args.amp, device)
    optimizer = torch.optim.AdamW(parameter_groups(model, [primary], learned, args.lr_factors[stage], base_lr),
                                  weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args, epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    weight_average = make_weight_average(model, args.ema_decay)
    scored = model if weight_average is None else weight_average.module  # validated, kept, passed on

    replay_banks, replay_rng, teacher = {}, torch.Generator().manual_seed(args.seed + stage), None
    if learned:  # the model as the previous stage left it (its kept checkpoint), frozen
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        previous = torch.load(out_dir / CHECKPOINT_NAMES[stage - 1], map_location="cpu", weights_only=False)
        teacher.load_state_dict(previous["model"])
        replay_banks = {task: ReplayBank(data["train"][task], teacher, replay_rng, precompute=not args.baseline_mode,
                                         amp_dtype=amp_dtype) for task in learned}

    start_epoch, best_key = 1, None
    if state.get("stage") == stage and "optimizer" in state:  # resuming inside this stage
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if weight_average is not None:
            weight_average.load_state_dict(state["weight_average"])
        start_epoch, best_key = state["epoch"] + 1, state["best_key"]
        replay_rng.set_state(state["replay_rng"])
    else:
        state["recent_scores"] = []

    new_images = new_images_distillation(args, stage, primary, learned, teacher, data["train"], amp_dtype, log)
    replayed = f" + {args.replay_batch_size[stage]} of each earlier task" if learned else ""
    log.info(f"stage {stage}: {primary} for {epochs} epochs, lr {base_lr:g}, batch {args.batch_size[stage]}{replayed}, "
             f"distilling {learned or 'nothing'}")
    for epoch in range(start_epoch, epochs + 1):
        started = time.time()
        set_seed(args.seed + 1000 * stage + epoch)  # same augmentation whether resumed or not
        set_train_mode(model, primary, learned, imagenet_statistics=args.pretrained)
        loader = make_loader(data["train"][primary], args.batch_size[stage], shuffle=True, workers=args.workers,
                             pin_memory=device.type == "cuda", seed=args.seed + 1000 * stage + epoch)
        batches = ({primary: batch} for batch in tqdm(loader, desc=f"s{stage} {primary} {epoch}/{epochs}",
                                                      leave=False, disable=None))
        losses = train_one_epoch(model, batches, replay_banks, optimizer, scaler, args, device, amp_dtype,
                                 weight_average, teacher, **new_images,
                                 replay_batch_size=args.replay_batch_size.get(stage))
        metrics = validate(scored, data["val"], seen, args)
        own = metrics[PRIMARY_METRIC[primary]]
        lr = head_lr(optimizer, primary)
        step_scheduler(scheduler, own)  # after reading the LR: the log has the one this epoch trained with
        state["recent_scores"] = (state.get("recent_scores", []) + [own])[-args.select_window:]
        key = selection_key(metrics, primary, state["baselines"], state["recent_scores"])
        is_best = best_key is None or key > best_key
        if is_best:
            best_key = key
            baselines = {**state["baselines"], PRIMARY_METRIC[primary]: own}
            save_atomic(checkpoint_dict(scored, args, data["class_names"], baselines, stage, epoch, metrics),
                        out_dir / CHECKPOINT_NAMES[stage])
        record = {"stage": stage, "task": primary, "epoch": epoch, "epochs": epochs, "lr": lr,
                  "losses": losses, **metrics, "baselines": state["baselines"], "best": is_best,
                  "time_s": round(time.time() - started, 2)}
        append_log_record(out_dir, record)
        log.info(f"stage {stage} epoch {epoch}/{epochs} loss {losses['total']:.4f} {scores_line(metrics)}"
                 f"{' *best*' if is_best else ''} ({record['time_s']:.1f}s)")
        state.update(stage=stage, epoch=epoch, best_key=best_key, optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), replay_rng=replay_rng.get_state(),
                     weight_average=None if weight_average is None else weight_average.state_dict())
        save_atomic({**state, "model": model.state_dict(), "args": vars(args)}, out_dir / "last.pt")
        state["epochs_this_run"] = state.get("epochs_this_run", 0) + 1
        if args.stop_after_epochs and state["epochs_this_run"] >= args.stop_after_epochs:
            raise SystemExit(f"stopped after {args.stop_after_epochs} epochs (--stop_after_epochs); "
                             "continue with --resume")

    best = torch.load(out_dir / CHECKPOINT_NAMES[stage], map_location="cpu", weights_only=False)
    model.load_state_dict(best["model"])
    if teacher is not None and args.blend_steps and not within_max_drop(best["metrics"], state["baselines"]):
        blend = blend_until_within(model, teacher, primary, state["baselines"], args.blend_steps,
                                   lambda m: validate(m, data["val"], seen, args), log)
        if blend is not None:
            alpha, metrics = blend
            baselines = {**state["baselines"], PRIMARY_METRIC[primary]: metrics[PRIMARY_METRIC[primary]]}
            best = {**checkpoint_dict(model, args, data["class_names"], baselines, stage, best["epoch"], metrics),
                    "blend": alpha}
            save_atomic(best, out_dir / CHECKPOINT_NAMES[stage])
            # one more log line, so plot_log.py and log_report.py show what the stage kept
            append_log_record(out_dir, {"stage": stage, "task": primary, "epoch": best["epoch"], "kept_blend": alpha,
                                        **metrics, "baselines": state["baselines"]})
    state["baselines"] = best["baselines"]
    blended = f" blended {best['blend']:g} with stage {stage - 1}'s weights" if "blend" in best else ""
    log.info(f"stage {stage} done: kept epoch {best['epoch']}{blended}, baselines {best['baselines']}")


# ----------------------------------------------------------------------------- main
def build_train_set(task, args, cache=True):
    """A task's training set with train.py's augmentation (flip, colour jitter, --TASK_scale_jitter,
    and for detection --det_mosaic)."""
    augment = train_augmentation(task, scale_jitter=getattr(args, f"{task}_scale_jitter"))
    mosaic = {"mosaic": args.det_mosaic} if task == "det" else {}
    return build_dataset(task, args.data_root, "train", args.img_sizes[task], cache=cache, augment=augment, **mosaic)


def load_data(args, cache=True, tasks=TASKS):
    """Train and val sets of `tasks` and their class names; `cache`: decode and resize every image
    once and keep it in memory (train.py's --baseline_mode decodes on every access instead)."""
    data = {"train": {task: build_train_set(task, args, cache) for task in tasks},
            "val": {task: build_dataset(task, args.data_root, "val", args.img_sizes[task], cache=cache)
                    for task in tasks}}
    data["class_names"] = {task: data["val"][task].class_names for task in tasks}
    return data


def check_imagenet_backbone_probe(args, cls_train_set):
    """--backbone_probe imagenet needs ImageNet weights in the backbone and ImageNet classes; checked
    at startup without reading the weights file, which stage 3 reads for the classifier."""
    if not args.pretrained:
        raise ValueError("--backbone_probe imagenet: the ImageNet classifier needs the pretrained backbone; "
                         "drop --no-pretrained or pass --backbone_probe fitted")
    try:
        imagenet_rows(cls_train_set.wnids)
    except ValueError as err:
        raise ValueError(f"--backbone_probe imagenet: {err} in {cls_train_set.root}") from None


def build_model(args, device, channels_last=True, imagenet_weights=True):
    """imagenet_weights=False: the weights will come from a checkpoint, so the ImageNet weights
    file is not read (an offline B0 run can resume)."""
    model = UnifiedMultiTaskModel(args.backbone, pretrained=args.pretrained and imagenet_weights).to(device)
    return model.use_channels_last() if channels_last else model


def write_demo_data(out_dir):
    """--demo's data (make_demo's 48 training and 24 val images per task; the other flags:
    DEMO_SETTINGS): generated into OUT_DIR/demo_data, beside the run it trains, so eval.py can
    score the run again (--data_root demo_out/demo_data)."""
    from demo_data import make_demo

    return str(make_demo(out_dir / "demo_data"))


def main(argv=None):
    args = parse_args(argv, build_parser(__doc__.split("\n\n")[0]))
    if args.demo and args.out_dir == ".":
        args.out_dir = "demo_out"
    if args.baseline_mode:  # this recipe run the straightforward way (--help lists what changes)
        args.amp = "off"
        for stage in (2, 3):
            set_factor(args.lr_factors[stage], "backbone", REFERENCE_BACKBONE_FACTOR)
    keep_freed_memory(not args.baseline_mode)
    out_dir = Path(args.out_dir)
    if not args.resume:
        refuse_to_overwrite(out_dir, ["training_log.jsonl", "last.pt", *CHECKPOINT_NAMES.values()],
                            "continue it with --resume or choose another --out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    log = setup_logging(out_dir)
    try:
        if args.demo:  # after the overwrite check: a refused run touches nothing of the earlier one
            args.data_root = write_demo_data(out_dir)
        device = pick_device(args.device)
        set_seed(args.seed)
        data = load_data(args, cache=not args.baseline_mode)
        if args.backbone_probe == "imagenet" and args.distill_backbone_probe > 0:
            check_imagenet_backbone_probe(args, data["train"]["cls"])  # now, not after two stages
        model = build_model(args, device, channels_last=not args.baseline_mode,
                            imagenet_weights=not (args.resume or args.start_from))
        state = {"baselines": {}}
        if args.resume:
            state = resume_state(out_dir, model, args)
        elif args.start_from:
            state = start_from_checkpoint(Path(args.start_from), out_dir, model, args)
    except (DataError, PretrainedWeightsError, ValueError, FileExistsError) as err:
        sys.exit(f"error: {err}")
    log.info(f"backbone {args.backbone} (pretrained={args.pretrained}), {describe_sizes(args.img_sizes)}, device {device}, "
             f"trainable_params {count_trainable_parameters(model)}")

    try:
        for stage, primary in STAGES:
            if stage >= state.get("stage", 1):  # a resumed run skips the stages it finished
                run_stage(stage, primary, model, data, state, args, device, log)
    except NonFiniteLossError as err:
        sys.exit(f"error: {err}: training stopped; checkpoints already written in {out_dir} are intact "
                 "(try a lower learning rate)")
    log.info(f"final model: {out_dir / CHECKPOINT_NAMES[3]}; baselines {state['baselines']}")
    if args.demo:
        import eval as evaluate_script

        evaluate_script.main(["--weights", str(out_dir / CHECKPOINT_NAMES[3]), "--data_root", args.data_root,
                              "--tasks", "all"])
    return state["baselines"]



if __name__ == "__main__":
    main()
