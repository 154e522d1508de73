"""Speed benchmark: the default training path against a straightforward baseline.

    python bench.py --device cpu                  # per-stage training img/s, eval img/s, speedup
    python bench.py --device cuda --pipeline      # also the wall time of a short full pipeline

Modes (each one adds a single optimisation to the previous, so the table is an ablation):
    baseline        decode + resize every image on every access, teacher forward on every
                    replay batch, default (NCHW) memory format, float32
    +channels_last  NHWC weights and inputs
    +cache          images decoded and resized once, kept in memory as uint8
    +teacher_cache  the frozen teacher's replay outputs computed once per stage (both flips)
    +frozen_backbone  stages 2-3 freeze the backbone (LR factor 0) instead of the reference's
                    0.005, so autograd skips it (stage 1 is unchanged)
    +keep_freed_memory  glibc keeps freed memory instead of returning it to the OS
                    (train.keep_freed_memory; the modes before it use glibc's own limits)
    default         + bf16 autocast where the device has native bf16, with train.py's own
                    factor table (options.LR_FACTORS), so it times what train.py does (since
                    session 26 its stage 3 lets the backbone's stride-32 blocks learn)

Throughput counts primary-task training images per second of a whole epoch (a training set, 240 images here,
replay batches and distillation included), at train.py's input size of each task (replay
batches at their own task's size) unless --img_size sets one for all. Every mode does train.py's default step: the
weight average (--ema_decay) is updated after every step, and in stages 2-3 the teacher also
runs on the new task's batch for the earlier tasks' distillation on it
(--distill_seg_new_images, in stage 3 --distill_det_new_images and the backbone probe's,
--distill_backbone_probe). One-time costs (building the image cache, precomputing the
teacher, fitting the backbone probe) are measured separately and, for the speedup, spread
over the stage's default number of epochs. The last line is
`speedup=<x>`: default over baseline, stage 3 (classification with seg + det replay), the
stage with the most replay work.
"""
import argparse
import copy
import itertools
import logging
import sys
import tempfile
import time

import torch

import options
import train
from datasets import DataError, build_dataset, make_loader
from metrics import evaluate
from models import BACKBONES, PretrainedWeightsError, UnifiedMultiTaskModel, input_size, pick_device
from replay import ReplayBank
from tasks import STAGES, TASKS

MODES = {  # name: (channels_last, cache, teacher_cache, backbone factor in stages 2-3 (None: train.py's), keep freed memory, amp)
    "baseline": (False, False, False, options.REFERENCE_BACKBONE_FACTOR, False, "off"),
    "+channels_last": (True, False, False, options.REFERENCE_BACKBONE_FACTOR, False, "off"),
    "+cache": (True, True, False, options.REFERENCE_BACKBONE_FACTOR, False, "off"),
    "+teacher_cache": (True, True, True, options.REFERENCE_BACKBONE_FACTOR, False, "off"),
    "+frozen_backbone": (True, True, True, 0.0, False, "off"),
    "+keep_freed_memory": (True, True, True, 0.0, True, "off"),
    "default": (True, True, True, None, True, "auto"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=options.HelpWithDefaults)
    p.add_argument("--data_root", default="DL_data", help="folder of the three datasets")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES,
                   help="the backbone timed (lite0: its weights come with its package; train.py defaults to b0)")
    p.add_argument("--img_size", type=input_size, default=None,
                   help="input size of every task (default: train.py's size of each task)")
    p.add_argument("--batch_size", type=int, nargs="+", metavar="N",
                   help="images of the stage's own task per step, as train.py's flag: one value for every "
                        "stage or three (default: train.py's, options.BATCH_SIZES)")
    p.add_argument("--replay_batch_size", type=int, nargs="+", metavar="N",
                   help="images of each earlier task replayed per step, as train.py's flag: one value for stages "
                        "2 and 3 or two (default: train.py's, options.REPLAY_BATCH_SIZES)")
    p.add_argument("--stages", default="3", help="comma list of stages to time (1, 2, 3); stage 3 gives speedup=")
    p.add_argument("--modes", default="baseline,default", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--steps", type=int, default=None, help="time only this many steps per epoch (default: all)")
    p.add_argument("--pipeline", action="store_true", help="also time a short full pipeline (1/1/1 epochs)")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",")]
    if any(s not in ("1", "2", "3") for s in stages):
        p.error(f"--stages {args.stages}: expected a comma list of 1, 2, 3")
    args.stages = [int(s) for s in stages]
    args.modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown mode {unknown[0]!r}, expected some of {', '.join(MODES)}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    args.size_flags = [] if args.img_size is None else ["--img_size", str(args.img_size)]
    args.batch_flags = [word for name in ("batch_size", "replay_batch_size") if getattr(args, name)
                        for word in (f"--{name}", *map(str, getattr(args, name)))]
    recipe = options.parse_args([*args.size_flags, *args.batch_flags])  # train.py's unless given here
    args.img_sizes, args.batch_sizes, args.replay_batch_sizes = (recipe.img_sizes, recipe.batch_size,
                                                                 recipe.replay_batch_size)
    return args


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_stage_epoch(stage, mode, args, device, data_cache):
    """(primary img/s of one epoch, one-time setup seconds, images per epoch) for a stage under a mode."""
    channels_last, cache, teacher_cache, backbone_factor, keep_memory, amp = MODES[mode]
    train.keep_freed_memory(keep_memory)
    primary = STAGES[stage - 1][1]
    learned = [task for _, task in STAGES[:stage - 1]]
    setup = 0.0
    if cache not in data_cache:
        started = time.perf_counter()
        recipe = options.parse_args(["--data_root", args.data_root, *args.size_flags])
        data_cache[cache] = {t: train.build_train_set(t, recipe, cache) for t in TASKS}
        data_cache[(cache, "build_s")] = time.perf_counter() - started
    data = data_cache[cache]
    setup += data_cache[(cache, "build_s")]

    torch.manual_seed(0)
    model = UnifiedMultiTaskModel(args.backbone, pretrained=True).to(device)
    if channels_last:
        model.use_channels_last()
    train_args = options.parse_args(["--backbone", args.backbone, "--amp", amp, *args.batch_flags])
    amp_dtype = train.autocast_dtype(amp, device)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    weight_average = train.make_weight_average(model, train_args.ema_decay)
    started = time.perf_counter()
    banks = {t: ReplayBank(data[t], teacher, torch.Generator().manual_seed(0), precompute=teacher_cache,
                           amp_dtype=amp_dtype) for t in learned}
    new_images = train.new_images_distillation(train_args, stage, primary, learned, teacher, data, amp_dtype,
                                               logging.getLogger("bench"))
    synchronize(device)
    setup += time.perf_counter() - started

    factors = dict(options.LR_FACTORS[stage])
    if stage > 1 and backbone_factor is not None:
        options.set_factor(factors, "backbone", backbone_factor)
    # the base LR does not change the time of a step (a factor of 0 freezes whatever the base)
    optimizer = torch.optim.AdamW(train.parameter_groups(model, [primary], learned, factors, 1e-4))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train.set_train_mode(model, primary, learned)
    loader = make_loader(data[primary], args.batch_sizes[stage], shuffle=True, pin_memory=device.type == "cuda")
    steps = args.steps or len(loader)

    def run(n):
        batches = ({primary: batch} for batch in itertools.islice(loader, n))
        return train.train_one_epoch(model, batches, banks, optimizer, scaler, train_args, device, amp_dtype,
                                     weight_average, teacher, **new_images,
                                     replay_batch_size=args.replay_batch_sizes.get(stage))

    run(1)  # warm-up: first-call kernel selection and allocations are not throughput
    synchronize(device)
    started = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    images = min(steps * args.batch_sizes[stage], len(data[primary]))
    return images / seconds, setup, len(data[primary])


def eval_throughput(args, device):
    model = UnifiedMultiTaskModel(args.backbone, pretrained=True).to(device).use_channels_last().eval()
    rates = {}
    for task in TASKS:
        dataset = build_dataset(task, args.data_root, "val", args.img_sizes[task], train=False)
        evaluate(model, dataset, task)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        evaluate(model, dataset, task)
        synchronize(device)
        rates[task] = len(dataset) / (time.perf_counter() - started)
    return rates


def time_pipeline(args, mode_flags):
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onehead_bench_") as out_dir:  # fresh: train.py never overwrites a run
        train.main(["--data_root", args.data_root, "--out_dir", out_dir, "--backbone", args.backbone,
                    *args.size_flags, "--device", args.device, *args.batch_flags,
                    "--epochs_seg", "1", "--epochs_det", "1", "--epochs_cls", "1", *mode_flags.split()])
    return time.perf_counter() - started


def main(argv=None):
    args = parse_args(argv)
    try:
        run_benchmark(args)
    except (DataError, PretrainedWeightsError, ValueError) as err:
        sys.exit(f"error: {err}")


def run_benchmark(args):
    device = pick_device(args.device)
    args.device = str(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    batches = " / ".join(str(b) for b in args.batch_sizes.values())
    replays = " / ".join(str(b) for b in args.replay_batch_sizes.values())
    print(f"device {name}, backbone {args.backbone}, {options.describe_sizes(args.img_sizes)}, batch {batches} "
          f"(stages 1-3) + replay {replays} (stages 2-3) per earlier task, torch {torch.__version__}")
    print(f"{'stage':<6} {'mode':<18} {'img/s':>8} {'setup s':>8} {'epoch s (+setup/epochs)':>24}")
    epoch_seconds = {}
    data_cache = {}
    for stage in args.stages:
        default_epochs = getattr(options.parse_args([]), f"epochs_{STAGES[stage - 1][1]}")
        for mode in args.modes:
            rate, setup, images = time_stage_epoch(stage, mode, args, device, data_cache)
            # One-time costs are paid once per stage: spread them over the stage's default epochs.
            seconds = images / rate + setup / default_epochs
            epoch_seconds[(stage, mode)] = seconds
            print(f"{stage:<6} {mode:<18} {rate:>8.1f} {setup:>8.1f} {seconds:>24.1f}", flush=True)
    rates = eval_throughput(args, device)
    print("eval img/s (float32): " + ", ".join(f"{t} {r:.1f}" for t, r in rates.items()))
    if args.pipeline:
        for flags in ("--baseline_mode", ""):
            print(f"pipeline 1/1/1 epochs {flags or '(default)'}: {time_pipeline(args, flags):.1f} s", flush=True)
    if (3, "baseline") in epoch_seconds and (3, "default") in epoch_seconds:
        print(f"speedup={epoch_seconds[(3, 'baseline')] / epoch_seconds[(3, 'default')]:.2f}")


if __name__ == "__main__":
    main()
