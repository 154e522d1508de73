"""The three tasks, the order they are learned in, and the forgetting rule: one place for
train.py, eval.py and the report tools (no torch here, so plot_log.py and summarize.py start
fast). Changing the order of the tasks starts at STAGES (README, "Changing one idea")."""

TASKS = ("seg", "det", "cls")
TASK_NAMES = {"seg": "segmentation", "det": "detection", "cls": "classification"}
STAGES = ((1, "seg"), (2, "det"), (3, "cls"))  # the order of the single pass
PRIMARY_METRIC = {"seg": "mIoU", "det": "mAP_50", "cls": "top1"}  # each task's score
MAX_DROP_PERCENT = 5.0  # the forgetting criterion: MET when a task's drop is at most this


def drop_percent(baseline, final):
    """Relative loss of a task's score, in percent of its baseline (negative = improved; 0 for a
    baseline of 0, which no score can fall under)."""
    return (baseline - final) / baseline * 100.0 if baseline > 0 else 0.0


def within_max_drop(metrics, baselines):
    """True when every task in `baselines` scores within 5% of its baseline in `metrics`."""
    return all(drop_percent(baselines[m], metrics[m]) <= MAX_DROP_PERCENT for m in baselines)
