"""Figures from the machine-readable training log written by train.py (or joint.py).

    python plot_log.py                                  # after a bare `python train.py`
    python plot_log.py --log runs/lite0/training_log.jsonl --out_dir plots
    python plot_log.py --log runs/lite0 --out_dir plots      # a run folder: the log in it
    python plot_log.py --log runs/joint/joint_log.jsonl --out_dir plots_joint  # a joint.py run

The log has one JSON object per finished epoch (see train.py), for example

    {"stage": 2, "task": "det", "epoch": 3, "epochs": 30, "lr": 0.003,
     "losses": {"total": 1.23, "det": 1.1, "distill_seg": 0.13}, "mAP_50": 0.031, "mIoU": 0.52,
     "baselines": {"mIoU": 0.54}, "best": true, "time_s": 12.3}

"baselines" holds the earlier tasks' (none in stage 1); "best" marks an epoch that replaced
the stage's kept checkpoint, so the kept epoch is the last one marked. A stage that kept a
blend with the previous stage's weights instead (train.py --blend_steps) has one more line,
the blend's scores with "kept_blend": its share of the stage's weights.

Writes, for the stages present in the log:
  stage1_segmentation_metrics.png, stage2_detection_metrics.png,
  stage3_classification_metrics.png  losses, validation metric of every task seen
                                      so far (earlier tasks' baselines dashed, their
                                      5% drop lines dotted) and lr (of the stage's
                                      own head), per epoch; the kept epoch is marked
  forgetting_summary.png              each task's score at the kept checkpoint of every
                                      stage against its baseline and 5% drop line
A resumed run may repeat a (stage, epoch): the later line wins. A stage the log does not hold
to its last epoch (stopped, or still running) is marked unfinished.

joint.py's log ("task": "joint", no stage) gives joint_metrics.png instead: losses, the
validation metric of every task trained together and lr, per epoch, with the kept epoch
(the best mean score) marked; there are no baselines or drops in a joint run.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import tasks  # noqa: E402

# What each stage's figure shows, stage -> (task, title, metric), in the training order of tasks.STAGES
STAGE_PLOTS = {stage: (task, tasks.TASK_NAMES[task].capitalize(), tasks.PRIMARY_METRIC[task])
               for stage, task in tasks.STAGES}
EXTRA_METRICS = {"mIoU": ["mIoU_fg"]}  # auxiliary curves drawn on a task's panel
EXTRA_LABELS = {"mIoU_fg": "mIoU_fg (foreground classes only)"}
COLORS = {"mIoU": "tab:blue", "mAP_50": "tab:orange", "top1": "tab:green"}
LOG_NAMES = ("training_log.jsonl", "joint_log.jsonl")  # train.py's, joint.py's


class LogError(ValueError):
    """The log file is missing, empty or malformed, or the figures' folder cannot be made (the
    message names the file and line, or the flag)."""


def log_file(path):
    """`path`, or for a run folder the log in it (training_log.jsonl, else joint_log.jsonl)."""
    if not os.path.isdir(path):
        return path
    logs = [os.path.join(path, name) for name in LOG_NAMES if os.path.isfile(os.path.join(path, name))]
    if not logs:
        raise LogError(f"{path}: a folder without {' or '.join(LOG_NAMES)}")
    return logs[0]


def load_log(path):
    """Read training_log.jsonl (or joint_log.jsonl, or the one in the run folder `path`) -> list
    of records sorted by (stage, epoch), a stage's kept blend (if any) right after the epoch it
    blended; a joint log's records have no stage and are sorted by epoch.

    When a (stage, epoch) appears more than once (a resumed run), the later line wins.
    Raises LogError for a missing/empty file, a line that is not a JSON object with
    integer "stage" (1-3) or "task": "joint" and an integer "epoch", or a log that mixes the two.
    """
    path = log_file(path)
    if not os.path.isfile(path):
        raise LogError(f"{path}: log file not found")
    records = {}
    with open(path, encoding="utf-8") as f:
        try:
            lines = f.readlines()
        except UnicodeDecodeError:
            raise LogError(f"{path}: not a text file; expected a JSON-lines log such as training_log.jsonl") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise LogError(f"{where}: not valid JSON ({e.msg})") from None
        joint = isinstance(rec, dict) and is_joint(rec)
        if not isinstance(rec, dict) or not (joint or "stage" in rec):
            raise LogError(f'{where}: expected a JSON object with a "stage" key (or "task": "joint")')
        if not joint and rec["stage"] not in STAGE_PLOTS:
            raise LogError(f"{where}: unknown stage {rec['stage']!r} (expected 1, 2 or 3)")
        if not isinstance(rec.get("epoch"), int):
            raise LogError(f'{where}: expected an integer "epoch"')
        if records and is_joint(next(iter(records.values()))) != joint:
            raise LogError(f"{where}: mixes joint.py and train.py records; expected one run's log")
        records[(rec.get("stage", 0), rec["epoch"], "kept_blend" in rec)] = rec
    if not records:
        raise LogError(f"{path}: log is empty")
    return [records[k] for k in sorted(records)]


def group_by_stage(records):
    """{stage: its records in epoch order} for a train.py log as load_log returns it."""
    by_stage = {}
    for rec in records:
        by_stage.setdefault(rec["stage"], []).append(rec)
    return by_stage


def is_joint(rec):
    return rec.get("task") == "joint"


def value(rec, key):
    """A metric or loss as float; NaN where missing so matplotlib leaves a gap."""
    v = rec.get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def epoch_records(recs):
    """A stage's records without its kept blend's line: one per epoch."""
    return [r for r in recs if "kept_blend" not in r]


def lowest_kept(baseline):
    """The lowest score within the 5% rule (tasks.MAX_DROP_PERCENT) of `baseline`."""
    return baseline * (1 - tasks.MAX_DROP_PERCENT / 100)


def kept_record(recs):
    """(record, flagged) of the stage's kept checkpoint: its kept blend, else the last epoch
    flagged best, else (flagged False) the last epoch."""
    blends = [r for r in recs if "kept_blend" in r]
    best = [r for r in recs if r.get("best")]
    return (blends or best or recs)[-1], bool(blends or best)


def kept_label(recs):
    """'kept epoch 27', 'kept epoch 12 blended 0.65 with the previous stage', with ', unfinished
    (5 of 30 epochs)' for a stage the log does not hold to its last epoch."""
    kept, flagged = kept_record(recs)
    label = f"kept epoch {kept['epoch']}" + ("" if flagged else " (last; none flagged best)")
    if "kept_blend" in kept:
        label += f" blended {kept['kept_blend']:g} with the previous stage"
    if unfinished(recs):
        label += f", unfinished ({len(epoch_records(recs))} of {epoch_records(recs)[-1]['epochs']} epochs)"
    return label


def unfinished(recs):
    """Whether the log stops before the stage's last epoch (a stopped or running stage)."""
    last = epoch_records(recs)[-1]
    return isinstance(last.get("epochs"), int) and last["epoch"] < last["epochs"]


def plot_stage(stage, recs, path):
    """One stage: its losses, the metric of every task seen so far (the earlier tasks'
    baselines and 5% drop lines drawn), lr."""
    task, title, _ = STAGE_PLOTS[stage]
    metrics = [STAGE_PLOTS[s][2] for s in STAGE_PLOTS if s <= stage]
    kept, _ = kept_record(recs)
    baselines = {m: b for m, b in (kept.get("baselines") or {}).items() if m in metrics[:-1]}
    plot_epochs(recs, f"Stage {stage}: {title} ({task})", metrics, baselines, path)


def plot_joint(recs, path):
    """A joint.py run: its losses, the metric of every task it trains, lr; no baselines."""
    # joint.py logs before 2026-11-25 do not name their tasks: those whose metric they hold
    trained = recs[-1].get("tasks") or [task for task, _, metric in STAGE_PLOTS.values() if any(metric in r for r in recs)]
    metrics = [metric for task, _, metric in STAGE_PLOTS.values() if task in trained]
    plot_epochs(recs, f"Joint training ({', '.join(trained)})", metrics, {}, path)


def plot_epochs(recs, title, metrics, baselines, path):
    """Losses, one panel per metric (with the baseline and 5% drop lines of those in
    `baselines`) and lr (where the log has it), per epoch; the kept epoch (or blend) is starred."""
    kept, _ = kept_record(recs)
    kept_name = f"kept (blend {kept['kept_blend']:g})" if "kept_blend" in kept else "kept"
    title = f"{title}, {kept_label(recs)}"
    recs = epoch_records(recs)
    epochs = [r["epoch"] for r in recs]

    lrs = [value(r, "lr") for r in recs]
    has_lr = not all(math.isnan(lr) for lr in lrs)  # joint logs before session 22 have none
    panels = 1 + len(metrics) + has_lr
    fig, axes = plt.subplots(panels, 1, sharex=True, figsize=(8, 2.4 * panels), squeeze=False)
    axes = axes[:, 0]
    fig.suptitle(title)

    # losses: every key in the log
    ax = axes[0]
    loss_keys = list(dict.fromkeys(k for r in recs for k in (r.get("losses") or {})))
    all_losses = []
    for k in loss_keys:
        ys = [value(r.get("losses") or {}, k) for r in recs]
        all_losses += [y for y in ys if not math.isnan(y)]
        style = dict(color="black", ls="--", lw=1.5) if k == "total" else dict(lw=1.2)  # total: over a lone task loss
        ax.plot(epochs, ys, marker=".", label=k, **style)
    if all_losses and min(all_losses) > 0 and max(all_losses) / min(all_losses) > 100:
        ax.set_yscale("log")
    ax.set_ylabel("loss")
    if loss_keys:
        ax.legend(fontsize=8, ncol=2)

    # one panel per task
    for ax, m in zip(axes[1:], metrics):
        color = COLORS[m]
        ax.plot(epochs, [value(r, m) for r in recs], marker=".", color=color, label=m)
        for extra in EXTRA_METRICS.get(m, []):
            if any(extra in r for r in recs):
                ax.plot(epochs, [value(r, extra) for r in recs], ls="-.", lw=1,
                        color=color, alpha=0.6, label=EXTRA_LABELS.get(extra, extra))
        ax.plot([kept["epoch"]], [value(kept, m)], marker="*", ms=14, color="red",
                ls="none", label=f"{kept_name}: {value(kept, m):.4g}")
        if m in baselines:
            b = baselines[m]
            ax.axhline(b, color=color, ls="--", lw=1, label=f"baseline {b:.4g}")
            ax.axhline(lowest_kept(b), color=color, ls=":", lw=1.2,
                       label=f"-{tasks.MAX_DROP_PERCENT:g}% ({lowest_kept(b):.4g})")
        ax.set_ylabel(f"val {m}")
        ax.legend(fontsize=8, loc="best")

    if has_lr:
        ax = axes[-1]
        ax.plot(epochs, lrs, marker=".", color="black")
        if all(lr > 0 for lr in lrs):  # also False when an lr is missing (NaN)
            ax.set_yscale("log")
        ax.set_ylabel("lr (task head)")
    ax = axes[-1]
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even just one

    for ax in axes:
        ax.axvline(kept["epoch"], color="gray", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_summary(by_stage, path):
    """Each task's score at the kept checkpoint of each stage vs. its baseline."""
    stages = sorted(by_stage)
    # latest known baselines; a task's own kept score where training has not recorded one
    baselines = {}
    for s in stages:
        baselines.update(kept_record(by_stage[s])[0].get("baselines") or {})
    own_stages = [s for s in STAGE_PLOTS if s <= stages[-1]]  # the stage of every task seen so far

    fig, axes = plt.subplots(1, len(own_stages), figsize=(4.5 * len(own_stages), 4), squeeze=False)
    fig.suptitle("Forgetting: score at each stage's kept checkpoint")
    for ax, own_stage in zip(axes[0], own_stages):
        _, title, m = STAGE_PLOTS[own_stage]
        xs = [s for s in stages if s >= own_stage]
        ys = [value(kept_record(by_stage[s])[0], m) for s in xs]
        base = baselines.get(m, ys[0])
        limit = lowest_kept(base)
        ax.axhline(base, color="gray", ls="--", label=f"baseline {base:.4g}")
        ax.axhline(limit, color="red", ls=":", label=f"{tasks.MAX_DROP_PERCENT:g}% drop {limit:.4g}")
        ax.plot(xs, ys, color=COLORS[m], lw=1.5)
        for x, y in zip(xs, ys):
            if math.isnan(y):  # metric missing from that stage's log
                continue
            drop = tasks.drop_percent(base, y)
            ok = drop <= tasks.MAX_DROP_PERCENT
            ax.plot(x, y, "o", ms=8, color="tab:green" if ok else "tab:red")
            ax.annotate(f"{y:.4g}\ndrop {drop:.2f}%", (x, y), textcoords="offset points",
                        xytext=(0, 9), ha="center", fontsize=8,
                        bbox=dict(fc="white", ec="none", alpha=0.8, pad=1))
        ax.set_xticks(list(STAGE_PLOTS), [f"after stage {s}\n({STAGE_PLOTS[s][0]})"
                                          + ("\nunfinished" if s in by_stage and unfinished(by_stage[s]) else "")
                                          for s in STAGE_PLOTS])
        ax.set_xlim(0.5, 3.5)
        ax.margins(y=0.3)
        ax.set_title(f"{title} ({m})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot losses, metrics, lr and forgetting "
                                     "from train.py's training_log.jsonl (or joint.py's joint_log.jsonl).")
    parser.add_argument("--log", default="training_log.jsonl",  # where a bare `python train.py` writes it
                        help="machine log written by train.py or joint.py, or the run folder holding it "
                             "(default: %(default)s)")
    parser.add_argument("--out_dir", default="plots",
                        help="folder for the PNG files (default: %(default)s)")
    args = parser.parse_args(argv)

    try:
        records = load_log(args.log)
        try:
            os.makedirs(args.out_dir, exist_ok=True)
        except OSError as e:
            raise LogError(f"--out_dir {args.out_dir}: {e.strerror}; expected a folder for the figures") from None
    except LogError as e:
        print(f"plot_log.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if is_joint(records[0]):
        path = os.path.join(args.out_dir, "joint_metrics.png")
        plot_joint(records, path)
        print(path)
        return [path]

    by_stage = group_by_stage(records)
    written = []
    for stage, recs in sorted(by_stage.items()):
        path = os.path.join(args.out_dir, f"stage{stage}_{STAGE_PLOTS[stage][1].lower()}_metrics.png")
        plot_stage(stage, recs, path)
        written.append(path)
    path = os.path.join(args.out_dir, "forgetting_summary.png")
    plot_summary(by_stage, path)
    written.append(path)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
