"""log_report.py on small synthetic training logs, and on a real tiny run's log."""
import json

import pytest
import torch

import checkpoints
import log_report
import train
from tiny import run_train


def record(stage, epoch, own, best, **earlier):
    """One epoch of train.py's log: the stage's own score, earlier tasks' scores, baselines."""
    task = train.STAGES[stage - 1][1]
    baselines = {"mIoU": 0.50, "mAP_50": 0.10}
    metrics = {log_report.PRIMARY_METRIC[task]: own, **earlier}
    return {"stage": stage, "task": task, "epoch": epoch, "epochs": 6, "lr": 1e-3, "losses": {"total": 1.0},
            **metrics, "baselines": {m: baselines[m] for m in earlier}, "best": best, "time_s": 1.0}


def stage3_log(tmp_path):
    """Stage 3 where the best Top-1 epochs (4-6) lose detection by more than 5%."""
    rows = [(0.70, 0.500, 0.100), (0.75, 0.495, 0.098), (0.74, 0.490, 0.096),  # within 5%
            (0.90, 0.490, 0.090), (0.92, 0.490, 0.080), (0.91, 0.470, 0.090)]  # det (or seg) > 5% down
    run = tmp_path / "seed0"
    run.mkdir()
    path = run / "training_log.jsonl"
    lines = [{**record(1, 1, 0.50, True), "epochs": 1}]
    lines += [record(3, e, top1, e in (1, 2, 3), mIoU=miou, mAP_50=ap)
              for e, (top1, miou, ap) in enumerate(rows, 1)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return path


def test_counts_epochs_within_5_percent_and_reports_the_kept_epoch(tmp_path, capsys):
    rows = log_report.main([str(stage3_log(tmp_path)), "--last", "2"])
    out = capsys.readouterr().out
    stage1, stage3 = rows
    assert stage1[:3] == ["seed0", "1", "1"] and stage1[4:6] == ["-", "-"]
    assert stage3[:3] == ["seed0", "3", "3"]
    assert stage3[3] == "top1 0.7400; mIoU 0.4900 (2.00); mAP_50 0.0960 (4.00)"
    assert stage3[4:6] == ["3 of 6", "0 of 2"]  # epochs 4-6 fail; of the last two none is within 5%
    assert stage3[6] == "top1 0.9150; mIoU 0.4800; mAP_50 0.0850"
    assert out.count("\n| seed0 |") == 2 and "mean of the last 2 epochs" in out


def test_a_run_folder_stands_for_its_log(tmp_path):
    log = stage3_log(tmp_path)
    assert log_report.main([str(log.parent)]) == log_report.main([str(log)])


def test_rerank_follows_train_selection_rule(tmp_path):
    path = stage3_log(tmp_path)
    recs = log_report.stage_records(path)[3]
    # epochs within 5% always win; among epochs 1-3 window 1 takes the best single Top-1 (epoch 2),
    # window 3 the best three-epoch mean (epoch 3: 0.730 against 0.725 and 0.70)
    assert log_report.rerank(recs, 1) == 2
    assert log_report.rerank(recs, 3) == 3
    rows = log_report.main([str(path), "--stage", "3", "--select_window", "1"])
    assert len(rows) == 1 and rows[0][4] == "2"


def test_rerank_agrees_with_the_epochs_a_real_run_kept(demo_root, tmp_path):
    """A tiny three-stage run: re-ranking its log with its own --select_window gives the epoch of
    every checkpoint it wrote."""
    run_train(demo_root, tmp_path, "--epochs_seg", "3", "--epochs_det", "3", "--select_window", "2")
    by_stage = log_report.stage_records(tmp_path / "training_log.jsonl")
    for stage, name in checkpoints.CHECKPOINT_NAMES.items():
        kept = torch.load(tmp_path / name, map_location="cpu", weights_only=False)["epoch"]
        assert log_report.rerank(by_stage[stage], 2) == kept, stage
        assert log_report.kept_record(by_stage[stage])[0]["epoch"] == kept, stage


def test_bad_logs_are_one_line_errors(tmp_path, capsys):
    joint_log = tmp_path / "joint_log.jsonl"
    joint_log.write_text(json.dumps({"task": "joint", "epoch": 1, "tasks": ["seg"], "mIoU": 0.3}) + "\n")
    stage3 = str(stage3_log(tmp_path))
    for argv, expected in ([str(tmp_path / "missing.jsonl")], "log file not found"), \
                          ([str(joint_log)], "a joint.py log has no stages"), \
                          ([stage3, "--stage", "2"], "no log has stage 2 epochs"):
        with pytest.raises(SystemExit) as err:
            log_report.main(argv)
        assert err.value.code == 2
        message = capsys.readouterr().err.strip()
        assert expected in message and "\n" not in message
    with pytest.raises(SystemExit) as err:
        log_report.main([stage3, "--last", "0"])
    assert err.value.code == 2 and "--last" in capsys.readouterr().err


def test_with_stage_a_log_without_that_stage_is_left_out_with_a_note(tmp_path, capsys):
    with_stage3 = stage3_log(tmp_path)
    stage1_only = tmp_path / "stopped" / "training_log.jsonl"
    stage1_only.parent.mkdir()
    stage1_only.write_text(json.dumps(record(1, 1, 0.5, True)) + "\n")
    rows = log_report.main([str(stage1_only), str(with_stage3), "--stage", "3"])
    assert [row[:2] for row in rows] == [["seed0", "3"]]
    assert capsys.readouterr().err.strip() == f"log_report.py: {stage1_only}: no stage 3 epochs, left out"


def test_the_kept_column_names_a_kept_blend_and_an_unfinished_stage(tmp_path):
    recs = [record(3, e, 0.9, e == 2, mIoU=0.4, mAP_50=0.05) for e in (1, 2, 3)]  # of 6 epochs
    blend = {"stage": 3, "task": "cls", "epoch": 2, "kept_blend": 0.65, "top1": 0.8, "mIoU": 0.49, "mAP_50": 0.098,
             "baselines": recs[0]["baselines"]}
    log = tmp_path / "run" / "training_log.jsonl"
    log.parent.mkdir()
    log.write_text("".join(json.dumps(r) + "\n" for r in recs + [blend]))
    [row] = log_report.main([str(log), "--last", "6"])
    assert row[2] == "2, blend 0.65 (3 of 6 run)"
    assert row[3] == "top1 0.8000; mIoU 0.4900 (2.00); mAP_50 0.0980 (2.00)"  # the blend's scores
    assert row[4:7] == ["0 of 3", "0 of 3", "top1 0.9000; mIoU 0.4000; mAP_50 0.0500"]  # the epochs' only


def test_names_the_detection_classes_behind_its_drops(tmp_path, capsys):
    """Stage 3 epochs 3-4 lose detection (mAP 0.20 -> 0.11 and 0.10, baseline 0.20) through class
    2 (AP 0.6 -> 0.3 of the three classes with val boxes; class 1 has none: None)."""
    per_class = [[0.0, None, 0.6, 0.0], [0.0, None, 0.6, 0.0], [0.0, None, 0.3, 0.03], [0.0, None, 0.3, 0.0]]
    recs = []
    for epoch, aps in enumerate(per_class, 1):
        rec = record(3, epoch, 0.8, epoch == 1, mIoU=0.5, mAP_50=sum(ap for ap in aps if ap is not None) / 3)
        rec["baselines"]["mAP_50"] = 0.2
        recs.append({**rec, "AP50_per_class": aps})
    assert [log_report.lost_detection(r) for r in recs] == [False, False, True, True]
    rows = log_report.detection_drop_classes(recs)
    assert [(c, round(held, 3), round(lost, 3)) for c, held, lost, _ in rows] == [(2, 0.6, 0.3)]
    # more than all of the gap (0.2 - 0.105): class 3 moved the other way
    assert rows[0][3] == pytest.approx(0.3 / 3 / 0.095)

    run = tmp_path / "seed0"
    run.mkdir()
    log = run / "training_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    log_report.main([str(log)])  # no checkpoint beside the log: class indices
    expected = "seed0, stage 3: detection AP@0.5 per class, mean of the epochs that held it -> of the 2 that lost it: "
    assert capsys.readouterr().out.splitlines()[-1] == expected + "class 2 0.600 -> 0.300 (105% of the gap)"
    torch.save({"class_names": {"det": ["person", "car", "couch", "cup"]}}, run / checkpoints.CHECKPOINT_NAMES[2])
    log_report.main([str(log)])
    assert capsys.readouterr().out.splitlines()[-1] == expected + "couch 0.600 -> 0.300 (105% of the gap)"

    (run / checkpoints.CHECKPOINT_NAMES[2]).write_text("not a checkpoint")
    with pytest.raises(SystemExit) as err:
        log_report.main([str(log)])
    message = capsys.readouterr().err.strip()
    assert err.value.code == 2 and "model_s2_best.pt: not a readable checkpoint" in message and "\n" not in message

    for r in recs:  # every epoch held detection: nothing to explain, no line
        r["baselines"]["mAP_50"] = 0.1
    assert log_report.detection_drop_classes(recs) == []
    assert log_report.detection_drop_lines("seed0", {3: recs}, log) == []
