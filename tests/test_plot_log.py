"""plot_log.py on small synthetic training logs (no training needed)."""
import json
from pathlib import Path

import pytest

import plot_log

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGE_PNGS = ["stage1_segmentation_metrics.png", "stage2_detection_metrics.png",
              "stage3_classification_metrics.png"]


def record(stage, epoch, best, **metrics):
    task, _, metric = plot_log.STAGE_PLOTS[stage]
    losses = {"total": 1.0 / epoch, task: 0.8 / epoch}
    if stage > 1:
        losses["distill_seg"] = 0.05
    baselines = {"mIoU": 0.33} if stage > 1 else {}
    if stage > 2:
        baselines["mAP_50"] = 0.12
    return {"stage": stage, "task": task, "epoch": epoch, "epochs": 3, "lr": 1e-4 / epoch,
            "losses": losses, **metrics, "baselines": baselines, "best": best, "time_s": 1.0}


def write_log(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def three_stage_records():
    return [
        record(1, 1, True, mIoU=0.20, mIoU_fg=0.15),
        record(1, 2, True, mIoU=0.30, mIoU_fg=0.25),
        record(1, 2, True, mIoU=0.33, mIoU_fg=0.27),  # resumed run repeats epoch 2
        record(1, 3, False, mIoU=0.31, mIoU_fg=0.26),
        record(2, 1, True, mIoU=0.32, mAP_50=0.10),
        record(2, 2, True, mIoU=0.31, mAP_50=0.12),
        record(3, 1, False, mIoU=0.30, mAP_50=0.11, top1=0.85),  # no epoch flagged best
        record(3, 2, False, mIoU=0.29, mAP_50=0.10, top1=0.90),
    ]


def assert_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > 10_000


def test_load_log_later_line_wins(tmp_path):
    records = plot_log.load_log(write_log(tmp_path / "log.jsonl", three_stage_records()))
    assert [(r["stage"], r["epoch"]) for r in records] == [
        (1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2)]
    assert records[1]["mIoU"] == 0.33


def test_three_stages_write_all_figures(tmp_path, capsys):
    log = write_log(tmp_path / "log.jsonl", three_stage_records())
    out = tmp_path / "plots"
    plot_log.main(["--log", str(log), "--out_dir", str(out)])
    printed = capsys.readouterr().out
    for name in STAGE_PNGS + ["forgetting_summary.png"]:
        assert_png(out / name)
        assert str(out / name) in printed


def test_bare_command_reads_the_log_of_a_bare_train_run(tmp_path, monkeypatch):
    import options  # train.py's default --out_dir
    monkeypatch.chdir(tmp_path)
    write_log(Path(options.parse_args([]).out_dir) / "training_log.jsonl", three_stage_records())
    plot_log.main([])
    assert_png(tmp_path / "plots" / "forgetting_summary.png")


def test_each_stage_figure_draws_the_earlier_tasks_baselines_only(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plot_log, "plot_epochs",
                        lambda recs, title, metrics, baselines, path: drawn.append((metrics, baselines)))
    monkeypatch.setattr(plot_log, "plot_summary", lambda by_stage, path: None)
    plot_log.main(["--log", str(write_log(tmp_path / "log.jsonl", three_stage_records())),
                   "--out_dir", str(tmp_path / "plots")])
    assert drawn == [(["mIoU"], {}), (["mIoU", "mAP_50"], {"mIoU": 0.33}),
                     (["mIoU", "mAP_50", "top1"], {"mIoU": 0.33, "mAP_50": 0.12})]


def test_stage1_only(tmp_path):
    log = write_log(tmp_path / "log.jsonl", three_stage_records()[:4])
    out = tmp_path / "plots"
    plot_log.main(["--log", str(log), "--out_dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == [
        "forgetting_summary.png", "stage1_segmentation_metrics.png"]
    assert_png(out / "forgetting_summary.png")


@pytest.mark.parametrize("extra, expect", [
    ('{"stage": 2, "epoch": 3, "mIoU": 0.3', "line 9"),   # truncated JSON
    ('{"epoch": 3, "mIoU": 0.3}', "line 9"),             # no "stage"
])
def test_bad_line_exits_2(tmp_path, capsys, extra, expect):
    log = write_log(tmp_path / "log.jsonl", three_stage_records(), [extra])
    with pytest.raises(SystemExit) as exc:
        plot_log.main(["--log", str(log), "--out_dir", str(tmp_path / "plots")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(log) in err and expect in err
    assert len(err.strip().splitlines()) == 1


def joint_record(epoch, best, tasks=("seg", "det", "cls")):
    metrics = {"seg": {"mIoU": 0.2 + 0.05 * epoch}, "det": {"mAP_50": 0.01 * epoch}, "cls": {"top1": 0.5 + 0.1 * epoch}}
    return {"task": "joint", "tasks": list(tasks), "epoch": epoch, "epochs": 3, "lr": 1e-3,
            "losses": {"total": 3.0 / epoch, **{t: 1.0 / epoch for t in tasks}},
            **{k: v for t in tasks for k, v in metrics[t].items()}, "mean_score": 0.3, "best": best, "time_s": 1.0}


@pytest.mark.parametrize("tasks", [("seg", "det", "cls"), ("det",)])
def test_a_joint_log_gives_one_figure_of_the_tasks_it_trained(tmp_path, capsys, tasks, monkeypatch):
    log = write_log(tmp_path / "joint_log.jsonl", [joint_record(e, e != 3, tasks) for e in (1, 2, 3)])
    drawn = {}
    real_plot_epochs = plot_log.plot_epochs

    def plot_epochs(recs, title, metrics, baselines, path):
        drawn.update(metrics=metrics, baselines=baselines, epochs=[r["epoch"] for r in recs])
        real_plot_epochs(recs, title, metrics, baselines, path)

    monkeypatch.setattr(plot_log, "plot_epochs", plot_epochs)
    out = tmp_path / "plots"
    assert plot_log.main(["--log", str(log), "--out_dir", str(out)]) == [str(out / "joint_metrics.png")]
    assert [p.name for p in out.iterdir()] == ["joint_metrics.png"]
    assert_png(out / "joint_metrics.png")
    expected = [plot_log.STAGE_PLOTS[s][2] for s in plot_log.STAGE_PLOTS if plot_log.STAGE_PLOTS[s][0] in tasks]
    assert drawn == {"metrics": expected, "baselines": {}, "epochs": [1, 2, 3]}


def test_a_log_without_lr_gets_no_lr_panel(tmp_path, monkeypatch):
    records = [{k: v for k, v in joint_record(e, True).items() if k != "lr"} for e in (1, 2)]
    panels = []
    real_subplots = plot_log.plt.subplots
    monkeypatch.setattr(plot_log.plt, "subplots", lambda n, *a, **kw: panels.append(n) or real_subplots(n, *a, **kw))
    plot_log.main(["--log", str(write_log(tmp_path / "log.jsonl", records)), "--out_dir", str(tmp_path / "plots")])
    assert panels == [1 + 3]  # losses and the three metrics
    assert_png(tmp_path / "plots" / "joint_metrics.png")


def test_a_log_mixing_joint_and_stage_records_exits_2(tmp_path, capsys):
    log = write_log(tmp_path / "log.jsonl", three_stage_records()[:2], [json.dumps(joint_record(1, True))])
    with pytest.raises(SystemExit) as exc:
        plot_log.main(["--log", str(log), "--out_dir", str(tmp_path / "plots")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "mixes joint.py and train.py records" in err


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_missing_or_empty_log_exits_2(tmp_path, capsys, content):
    log = tmp_path / "log.jsonl"
    if content is not None:
        log.write_text(content)
    with pytest.raises(SystemExit) as exc:
        plot_log.main(["--log", str(log), "--out_dir", str(tmp_path / "plots")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(log) in err and len(err.strip().splitlines()) == 1


def drawn_figures(monkeypatch):
    """The figures plot_log draws, kept open for the test to read (it closes them after saving)."""
    figures = []
    monkeypatch.setattr(plot_log.plt, "close", figures.append)
    return figures


def test_a_kept_blend_is_the_stages_kept_point(tmp_path, monkeypatch):
    records = three_stage_records()
    blend = {"stage": 3, "task": "cls", "epoch": 2, "kept_blend": 0.65, "mIoU": 0.32, "mAP_50": 0.118, "top1": 0.80,
             "baselines": records[-1]["baselines"]}
    log = write_log(tmp_path / "log.jsonl", records + [blend])
    by_stage = plot_log.group_by_stage(plot_log.load_log(log))
    assert plot_log.kept_record(by_stage[3]) == (blend, True)
    assert [r["epoch"] for r in plot_log.epoch_records(by_stage[3])] == [1, 2]  # the curves: epochs only
    assert plot_log.kept_label(by_stage[3]).startswith("kept epoch 2 blended 0.65 with the previous stage")
    figures = drawn_figures(monkeypatch)
    plot_log.main(["--log", str(log), "--out_dir", str(tmp_path / "plots")])
    stage3, summary = figures[2], figures[3]
    assert "blended 0.65" in stage3._suptitle.get_text()
    assert any(text.get_text() == "kept (blend 0.65): 0.8" for text in stage3.axes[3].get_legend().get_texts())
    detection_after_stage3 = [t.get_text() for t in summary.axes[1].texts][-1]
    assert detection_after_stage3 == "0.118\ndrop 1.67%"  # the blend's, not epoch 2's 0.10 (16.67%)


def test_an_unfinished_stage_is_labelled_so(tmp_path, monkeypatch):
    log = write_log(tmp_path / "log.jsonl", three_stage_records()[:5])  # stage 2: epoch 1 of 3
    figures = drawn_figures(monkeypatch)
    plot_log.main(["--log", str(log), "--out_dir", str(tmp_path / "plots")])
    stage1, stage2, summary = figures
    assert stage1._suptitle.get_text().endswith("kept epoch 2")  # 3 of 3 epochs
    assert stage2._suptitle.get_text().endswith("kept epoch 1, unfinished (1 of 3 epochs)")
    ticks = [t.get_text() for t in summary.axes[0].get_xticklabels()]
    assert ticks[:2] == ["after stage 1\n(seg)", "after stage 2\n(det)\nunfinished"]
    # one epoch still gets whole-number epoch ticks
    assert all(tick == int(tick) for tick in stage2.axes[-1].get_xticks() if 0.5 <= tick <= 1.5)


def test_summary_drops_are_labelled_to_two_decimals(tmp_path, monkeypatch):
    records = three_stage_records()[:5]
    records[-1]["mIoU"] = 0.33 * (1 - 0.0504)  # 5.04% under the baseline: not MET, must not read "5.0%"
    figures = drawn_figures(monkeypatch)
    plot_log.main(["--log", str(write_log(tmp_path / "log.jsonl", records)), "--out_dir", str(tmp_path / "plots")])
    assert figures[-1].axes[0].texts[-1].get_text().endswith("drop 5.04%")


def test_a_binary_file_or_an_out_dir_that_is_a_file_exits_2(tmp_path, capsys):
    binary = tmp_path / "model_s1_best.pt"
    binary.write_bytes(b"\x80\x02 a checkpoint")
    a_file = tmp_path / "afile"
    a_file.write_text("")
    log = write_log(tmp_path / "log.jsonl", three_stage_records())
    for argv, expected in ((["--log", str(binary)], f"{binary}: not a text file"),
                           (["--log", str(log), "--out_dir", str(a_file)], f"--out_dir {a_file}:")):
        with pytest.raises(SystemExit) as exc:
            plot_log.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_a_joint_log_that_does_not_name_its_tasks_draws_the_metrics_it_holds(tmp_path, monkeypatch):
    records = [{k: v for k, v in joint_record(e, True, ("det",)).items() if k != "tasks"} for e in (1, 2)]
    drawn = []
    monkeypatch.setattr(plot_log, "plot_epochs", lambda recs, title, metrics, baselines, path: drawn.append(metrics))
    plot_log.main(["--log", str(write_log(tmp_path / "log.jsonl", records)), "--out_dir", str(tmp_path / "plots")])
    assert drawn == [["mAP_50"]]


def test_a_run_folder_reads_the_log_in_it(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    write_log(tmp_path / "run" / "training_log.jsonl", three_stage_records())
    assert plot_log.load_log(tmp_path / "run") == plot_log.load_log(tmp_path / "run" / "training_log.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        plot_log.main(["--log", str(tmp_path / "empty"), "--out_dir", str(tmp_path / "plots")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "a folder without training_log.jsonl or joint_log.jsonl" in err
