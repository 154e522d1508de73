"""One table over several runs (seeds): the mean and spread of every score and drop.

    python eval.py --weights runs/seed0/model_final_best_1pass.pt --data_root DL_data --tasks all \
        --json runs/seed0/eval_final.json                      # once per run
    python summarize.py runs/seed*/eval_final.json

Reads the JSON reports of eval.py (--json) and prints, as Markdown, one row per run
(baseline -> final, drop %, per task) and one row per task over the runs: baseline and
final as mean (sample standard deviation), the final's min-max, the drop as mean (worst)
and in how many runs the task is MET (drop <= 5%). The reports must score the same split
with the same backbone and input sizes: pooling different settings is refused.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

from tasks import PRIMARY_METRIC

SAME_IN_EVERY_REPORT = ("split", "backbone", "img_sizes")


def load_report(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found (expected a report written by eval.py --json)")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a report written by eval.py --json)") from None
    if not isinstance(report, dict):
        raise ValueError(f"{path}: not a report of eval.py --json (expected a JSON object)")
    missing = [key for key in ("metrics", "baselines", "drops", "met", *SAME_IN_EVERY_REPORT) if key not in report]
    if missing:
        raise ValueError(f"{path}: not a report of eval.py --json (missing {', '.join(missing)})")
    return report


def check_comparable(reports):
    """The runs must differ only in what a seed changes."""
    first_path, first = next(iter(reports.items()))
    for path, report in reports.items():
        for key in SAME_IN_EVERY_REPORT:
            if report[key] != first[key]:
                raise ValueError(f"{path}: {key} {report[key]!r} differs from {first_path}'s {first[key]!r}; "
                                 "expected runs of one setting")
        if sorted(report["baselines"]) != sorted(first["baselines"]):  # e.g. a joint.py run among train.py runs
            raise ValueError(f"{path}: baselines for {sorted(report['baselines'])}, {first_path} for "
                             f"{sorted(first['baselines'])}; expected runs of one kind")


def mean_and_std(values):
    """'0.5236 (0.0292)': the mean and the sample standard deviation ('-' for a single run)."""
    spread = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "-"
    return f"{statistics.mean(values):.4f} ({spread})"


def table(reports):
    """Markdown lines: one row per run, then one row per task over the runs."""
    metrics = [name for task, name in PRIMARY_METRIC.items() if all(name in r["metrics"] for r in reports.values())]
    task_of = {name: task for task, name in PRIMARY_METRIC.items()}
    lines = ["| run | " + " | ".join(f"{task_of[m]} {m}: baseline -> final (drop %)" for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for path, r in reports.items():
        cells = [f"{r['baselines'][m]:.4f} -> {r['metrics'][m]:.4f} ({r['drops'][m]:.2f})" if m in r["baselines"]
                 else f"- -> {r['metrics'][m]:.4f}" for m in metrics]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    lines += ["", f"Over {len(reports)} runs:", "",
              "| task | metric | baseline, mean (std) | final, mean (std) | final, min-max | drop %, mean (worst) "
              "| MET |", "|---|---|---|---|---|---|---|"]
    runs = list(reports.values())
    for m in metrics:
        finals = [r["metrics"][m] for r in runs]
        if m in runs[0]["baselines"]:  # then in every run's (check_comparable)
            drops = [r["drops"][m] for r in runs]
            baseline = mean_and_std([r["baselines"][m] for r in runs])
            drop = f"{statistics.mean(drops):.2f} ({max(drops):.2f})"
            met = f"{sum(bool(r['met'][m]) for r in runs)} of {len(runs)}"
        else:  # a joint.py run has no baselines
            baseline = drop = met = "-"
        lines.append(f"| {task_of[m]} | {m} | {baseline} | {mean_and_std(finals)} | "
                     f"{min(finals):.4f}-{max(finals):.4f} | {drop} | {met} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", metavar="REPORT", help="JSON files written by eval.py --json")
    args = parser.parse_args(argv)
    try:
        reports = {path: load_report(path) for path in args.reports}
        check_comparable(reports)
    except ValueError as err:
        sys.exit(f"error: {err}")
    lines = table(reports)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
