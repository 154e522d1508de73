"""summarize.py: the table over several eval.py reports, and the reports it refuses."""
import json

import pytest

import summarize
from tasks import MAX_DROP_PERCENT, drop_percent


def write_report(path, finals, baselines, backbone="efficientnet_lite0", split="val"):
    """A report shaped like eval.py --json writes it (only the keys summarize.py reads)."""
    drops = {m: drop_percent(baselines[m], finals[m]) for m in baselines}
    report = {"metrics": finals, "baselines": baselines, "drops": drops,
              "met": {m: d <= MAX_DROP_PERCENT for m, d in drops.items()}, "backbone": backbone,
              "img_sizes": {"seg": 416, "det": 320, "cls": 224}, "split": split}
    path.write_text(json.dumps(report))
    return str(path)


def three_runs(tmp_path):
    runs = [({"mIoU": 0.5, "mAP_50": 0.10, "top1": 0.80}, {"mIoU": 0.5, "mAP_50": 0.10, "top1": 0.80}),
            ({"mIoU": 0.6, "mAP_50": 0.20, "top1": 0.90}, {"mIoU": 0.6, "mAP_50": 0.25, "top1": 0.90}),
            ({"mIoU": 0.7, "mAP_50": 0.30, "top1": 1.00}, {"mIoU": 0.8, "mAP_50": 0.30, "top1": 1.00})]
    return [write_report(tmp_path / f"seed{k}.json", finals, baselines) for k, (finals, baselines) in enumerate(runs)]


def test_the_table_gives_mean_spread_worst_drop_and_met_count(tmp_path, capsys):
    lines = summarize.main(three_runs(tmp_path))
    assert capsys.readouterr().out.splitlines() == lines
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| seg |") or line.startswith("| det |")}
    # mIoU finals 0.5 / 0.6 / 0.7, baselines 0.5 / 0.6 / 0.8: drops 0, 0, 12.5 (NOT MET)
    assert rows["| seg"] == "| seg | mIoU | 0.6333 (0.1528) | 0.6000 (0.1000) | 0.5000-0.7000 | 4.17 (12.50) | 2 of 3 |"
    # mAP finals 0.1 / 0.2 / 0.3, baselines 0.1 / 0.25 / 0.3: drops 0, 20, 0
    assert rows["| det"] == "| det | mAP_50 | 0.2167 (0.1041) | 0.2000 (0.1000) | 0.1000-0.3000 | 6.67 (20.00) | 2 of 3 |"
    per_run = next(line for line in lines if "seed2.json" in line)
    assert "0.8000 -> 0.7000 (12.50)" in per_run


def test_runs_without_baselines_get_no_drops(tmp_path):
    paths = [write_report(tmp_path / f"joint{k}.json", {"mIoU": 0.4 + k / 10, "mAP_50": 0.07, "top1": 0.88}, {})
             for k in range(2)]
    seg_row = next(line for line in summarize.main(paths) if line.startswith("| seg |"))
    assert seg_row == "| seg | mIoU | - | 0.4500 (0.0707) | 0.4000-0.5000 | - | - |"


@pytest.mark.parametrize("change, expected", [
    ({"backbone": "efficientnet_b0"}, "backbone 'efficientnet_b0' differs"),
    ({"split": "train"}, "split 'train' differs"),
    ({"baselines": {}}, "expected runs of one kind"),
])
def test_reports_of_different_settings_are_refused(tmp_path, change, expected):
    paths = three_runs(tmp_path)
    report = json.loads(open(paths[1]).read())
    report.update(change)
    (tmp_path / "seed1.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit) as exit_info:
        summarize.main(paths)
    assert expected in str(exit_info.value) and "seed1.json" in str(exit_info.value)


@pytest.mark.parametrize("content, expected", [
    (None, "file not found"), ("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
    (b"\x80\x02 a checkpoint", "not a text file"),
    ('{"metrics": {}}', "missing baselines, drops, met, split, backbone, img_sizes"),
])
def test_a_missing_or_malformed_report_is_a_one_line_error(tmp_path, content, expected):
    path = tmp_path / "report.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        summarize.main([str(path)])
    message = str(exit_info.value)
    assert message.startswith("error: ") and str(path) in message and expected in message
    assert len(message.splitlines()) == 1
