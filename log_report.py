"""Which epoch each stage kept, and how many of its epochs kept the earlier tasks within 5%.

    python log_report.py runs/seed0/training_log.jsonl
    python log_report.py runs/seed*/training_log.jsonl --stage 3 --last 10
    python log_report.py runs/seed0/training_log.jsonl --select_window 1   # re-rank the epochs

Reads train.py's training_log.jsonl (every epoch's val scores of every task seen) and prints,
as Markdown, one row per run and stage: the epoch the stage kept (the "best" flag train.py
wrote) and its scores with the earlier tasks' drops; how many epochs kept every earlier task
within 5% of its baseline (the epochs the selection rule prefers), over the stage and over
its last N epochs; and the mean of every score over the last N epochs, which is steadier
than a single epoch on 60 val images.

--select_window N re-ranks each stage's epochs with train.selection_key, as train.py would
have with that flag, and adds the epoch it would have kept. This is exact for the stage
itself; the later stages in the log still trained from the epoch that was actually kept.

Under the table, for each later stage whose epochs split into some that held detection within
5% and some that did not, a line names the detection classes behind the difference: each
class's mean AP@0.5 over the two groups of epochs and its share of the mAP gap. On 60 val
images a class with a handful of boxes can carry most of a drop (session 40: one couch box of
three); the names come from the stage-2 checkpoint beside the log, else class indices.
"""
import argparse
import sys
from pathlib import Path

import torch

from checkpoints import CHECKPOINT_NAMES
from options import HelpWithDefaults
from plot_log import LogError, epoch_records, group_by_stage, is_joint, kept_record, load_log, log_file, unfinished
from tasks import PRIMARY_METRIC, drop_percent, within_max_drop
from train import selection_key


def stage_records(path):
    """{stage: its records in order (epochs, and a kept blend's line)}; refuses a joint.py log
    (no stages, no baselines)."""
    records = load_log(path)
    if is_joint(records[0]):
        raise LogError(f"{path}: a joint.py log has no stages; expected train.py's training_log.jsonl")
    return group_by_stage(records)


def epochs_within_max_drop(recs):
    """How many of these epochs kept every earlier task within 5% of its baseline."""
    return sum(within_max_drop(rec, rec["baselines"]) for rec in recs)


def rerank(recs, window):
    """The epoch train.py would keep with --select_window `window`: the same key, the same
    tie rule (an epoch must beat the best so far strictly)."""
    best_key, best_epoch, recent = None, None, []
    for rec in recs:
        own = rec[PRIMARY_METRIC[rec["task"]]]
        recent = (recent + [own])[-window:]
        key = selection_key(rec, rec["task"], rec["baselines"], recent)
        if best_key is None or key > best_key:
            best_key, best_epoch = key, rec["epoch"]
    return best_epoch


def scores_at(rec):
    """'top1 0.8167; mIoU 0.5212 (1.70); ...': the stage's own score, then each earlier task's
    score with its drop in % of the baseline."""
    own = PRIMARY_METRIC[rec["task"]]
    parts = [f"{own} {rec[own]:.4f}"]
    parts += [f"{metric} {rec[metric]:.4f} ({drop_percent(base, rec[metric]):.2f})"
              for metric, base in rec["baselines"].items()]
    return "; ".join(parts)


def mean_scores(recs):
    metrics = [PRIMARY_METRIC[recs[0]["task"]], *recs[0]["baselines"]]
    return "; ".join(f"{metric} {sum(r[metric] for r in recs) / len(recs):.4f}" for metric in metrics)


def kept_cell(recs):
    """'27', '12, blend 0.65' (a kept blend of epoch 12), '2 (2 of 30 run)' (an unfinished stage)."""
    kept, flagged = kept_record(recs)
    cell = str(kept["epoch"]) if flagged else "none flagged"
    if "kept_blend" in kept:
        cell += f", blend {kept['kept_blend']:g}"
    if unfinished(recs):
        epochs = epoch_records(recs)
        cell += f" ({len(epochs)} of {epochs[-1]['epochs']} run)"
    return cell


def report_rows(name, by_stage, last, window=None):
    rows = []
    for stage, stage_recs in sorted(by_stage.items()):
        kept, _ = kept_record(stage_recs)
        recs = epoch_records(stage_recs)
        tail = recs[-last:]
        row = [name, str(stage), kept_cell(stage_recs), scores_at(kept)]
        if window:
            row.append(str(rerank(recs, window)))
        if stage > 1:
            row += [f"{epochs_within_max_drop(recs)} of {len(recs)}", f"{epochs_within_max_drop(tail)} of {len(tail)}"]
        else:
            row += ["-", "-"]  # nothing learned before stage 1, nothing to keep
        row.append(mean_scores(tail))
        rows.append(row)
    return rows


def lost_detection(rec):
    """Whether this epoch's detection mAP@0.5 is more than 5% under its baseline (train.py's rule)."""
    return not within_max_drop(rec, {"mAP_50": rec["baselines"]["mAP_50"]})


def detection_drop_classes(recs, most=3):
    """The detection classes that set the epochs which lost detection apart from those which
    held it: [(class index, mean AP@0.5 over the held epochs, over the lost ones, share of the
    mAP gap)], largest share first, up to `most` and no further than 80% of the gap (a share
    passes 100% when other classes moved the other way); [] when the stage has no epochs of
    one of the two kinds, or no per-class APs (a stage before detection's baseline)."""
    recs = [rec for rec in epoch_records(recs) if "mAP_50" in rec["baselines"] and rec.get("AP50_per_class")]
    lost = [rec for rec in recs if lost_detection(rec)]
    held = [rec for rec in recs if not lost_detection(rec)]
    if not lost or not held:
        return []

    def mean(group, key):
        return sum(key(rec) for rec in group) / len(group)

    gap = mean(held, lambda r: r["mAP_50"]) - mean(lost, lambda r: r["mAP_50"])
    scored = [c for c, ap in enumerate(recs[0]["AP50_per_class"]) if ap is not None]  # classes with val boxes
    rows = []
    for c in scored:  # mAP is the mean over these classes: each moves it by its AP change / len(scored)
        held_ap, lost_ap = mean(held, lambda r: r["AP50_per_class"][c]), mean(lost, lambda r: r["AP50_per_class"][c])
        rows.append((c, held_ap, lost_ap, (held_ap - lost_ap) / len(scored) / gap))
    rows.sort(key=lambda row: -row[3])
    chosen = []
    for row in rows[:most]:
        if row[3] <= 0 or sum(r[3] for r in chosen) >= 0.8:
            break
        chosen.append(row)
    return chosen


def detection_class_names(log_path):
    """The detection class names stored in the stage-2 checkpoint beside the log, or None."""
    path = Path(log_path).parent / CHECKPOINT_NAMES[2]
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise LogError(f"{path}: not a readable checkpoint ({type(err).__name__}); the detection class names "
                       "come from it (move it away to see class indices)") from None
    return ckpt.get("class_names", {}).get("det") if isinstance(ckpt, dict) else None


def detection_drop_lines(name, by_stage, log_path):
    """One line per stage with detection_drop_classes, names from the run's checkpoint."""
    found = {stage: rows for stage, recs in sorted(by_stage.items()) if (rows := detection_drop_classes(recs))}
    names = detection_class_names(log_path) if found else None
    lines = []
    for stage, rows in found.items():
        lost = sum(map(lost_detection, epoch_records(by_stage[stage])))
        parts = [f"{names[c] if names else f'class {c}'} {held:.3f} -> {lost_ap:.3f} ({share:.0%} of the gap)"
                 for c, held, lost_ap, share in rows]
        lines.append(f"{name}, stage {stage}: detection AP@0.5 per class, mean of the epochs that held it -> "
                     f"of the {lost} that lost it: {'; '.join(parts)}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    parser.add_argument("logs", nargs="+", metavar="LOG", help="training_log.jsonl files written by train.py "
                                                                "(or the run folders holding them)")
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="report only this stage (default: every stage)")
    parser.add_argument("--last", type=int, default=10, metavar="N",
                        help="the last N epochs of a stage: the second count and the means")
    parser.add_argument("--select_window", type=int, metavar="N",
                        help="also show the epoch train.py would have kept with this --select_window")
    args = parser.parse_args(argv)
    if args.last < 1 or (args.select_window is not None and args.select_window < 1):
        parser.error("--last and --select_window need a positive number of epochs")

    header = ["run", "stage", "kept epoch", "scores at the kept epoch (drop % of earlier tasks)"]
    if args.select_window:
        header.append(f"kept with --select_window {args.select_window}")
    header += ["epochs within 5%", f"of the last {args.last}", f"mean of the last {args.last} epochs"]
    rows, class_lines, left_out = [], [], []
    for path in args.logs:
        try:
            path = Path(log_file(path))  # a run folder: its log
            by_stage = stage_records(path)
            if args.stage:
                if args.stage not in by_stage:  # e.g. a run stopped before it, among finished ones
                    left_out.append(path)
                    continue
                by_stage = {args.stage: by_stage[args.stage]}
            name = path.parent.name or str(path)
            rows += report_rows(name, by_stage, args.last, args.select_window)
            class_lines += detection_drop_lines(name, by_stage, path)
        except LogError as err:
            print(f"log_report.py: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    if not rows:
        print(f"log_report.py: error: no log has stage {args.stage} epochs", file=sys.stderr)
        raise SystemExit(2)
    for path in left_out:
        print(f"log_report.py: {path}: no stage {args.stage} epochs, left out", file=sys.stderr)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if class_lines:
        lines += [""] + class_lines
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
