"""joint.py (the joint-training reference) and train.py's refusal to overwrite an earlier run."""
import json
import shutil

import pytest
import torch

import eval as eval_script
import joint
import options
import plot_log
import train
from datasets import TASKS
from models import UnifiedMultiTaskModel
from tiny import TINY, run_train

# train.py's tiny settings without the replay batch size, which is not a joint.py flag
_replay_flag = TINY.index("--replay_batch_size")
JOINT_TINY = TINY[:_replay_flag] + TINY[_replay_flag + 2:]


def test_joint_budget_defaults_to_the_sequential_one():
    args = joint.parse_args(["--epochs_seg", "6", "--epochs_det", "9", "--epochs_cls", "3"])
    assert args.epochs == 6
    assert joint.parse_args(["--epochs", "2"]).epochs == 2
    with pytest.raises(SystemExit):
        joint.parse_args(["--epochs", "0"])
    # A single task alone gets its own stage's length; a subset the mean of theirs.
    assert joint.parse_args(["--tasks", "det", "--epochs_det", "9"]).epochs == 9
    assert joint.parse_args(["--tasks", "cls,seg", "--epochs_seg", "6", "--epochs_cls", "3"]).epochs == 4


def test_joint_tasks_flag_rejects_unknown_tasks(capsys):
    assert joint.parse_args(["--tasks", "det,seg"]).tasks == ["seg", "det"]  # the single pass's order
    for bad in ("box", "det,", ""):
        with pytest.raises(SystemExit):
            joint.parse_args(["--tasks", bad])
        assert "--tasks" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--resume"], ["--demo"], ["--start_from", "model_s1_best.pt"],
                                   ["--replay_batch_size", "16"], ["--distill_seg_new_images", "4", "1"],
                                   ["--distill_det_new_images", "5"], ["--distill_backbone_probe", "1"],
                                   ["--distill_temp", "2"], ["--select_window", "1"], ["--baseline_mode"]])
def test_joint_has_no_train_only_flags(flags, capsys):
    with pytest.raises(SystemExit):
        joint.parse_args(flags)
    assert f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err
    options.parse_args(flags)  # train.py takes them


@pytest.mark.parametrize("flags", [["--lr_det", "1e-2"], ["--tasks", "det", "--lr_seg", "1e-2"],
                                   ["--lr_factor", "3", "neck", "0.5"]])
def test_joint_refuses_train_flags_it_would_ignore(flags, capsys):
    with pytest.raises(SystemExit):
        joint.parse_args(flags)
    assert "not used by a joint run" in capsys.readouterr().err


def test_joint_accepts_the_flags_it_uses():
    args = joint.parse_args(["--tasks", "det", "--lr_det", "1e-2", "--lr_factor", "1", "neck", "0.5"])
    assert args.lr_det == 1e-2 and args.lr_factors[1]["neck"] == 0.5


def test_joint_trains_every_head_and_shared_layer():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    groups = train.parameter_groups(model, TASKS, [], options.LR_FACTORS[1], base_lr=1e-3)
    names = {g["name"] for g in groups}
    assert {"seg_head", "det_head", "cls_head", "neck", "shared_late"} <= names
    assert all(g["factor"] == options.LR_FACTORS[1]["task_head"] for g in groups if g["name"].endswith("_head"))


@pytest.mark.parametrize("extra", [["--ema_decay", "0"], []], ids=["raw_weights", "weight_average"])
def test_joint_run_writes_a_checkpoint_eval_scores_the_same(demo_root, tmp_path, capsys, extra):
    joint.main(["--data_root", str(demo_root), "--out_dir", str(tmp_path), *JOINT_TINY, "--epochs", "2", *extra])
    records = [json.loads(line) for line in (tmp_path / "joint_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {"seg", "det", "cls"} <= set(record["losses"]) and {"mIoU", "mAP_50", "top1"} <= set(record)
        assert record["lr"] == pytest.approx(options.parse_args([]).lr_seg)  # heads at factor 1, no plateau yet
    assert plot_log.main(["--log", str(tmp_path / "joint_log.jsonl"), "--out_dir", str(tmp_path / "plots")]) == [
        str(tmp_path / "plots" / "joint_metrics.png")]
    ckpt = torch.load(tmp_path / joint.CHECKPOINT_NAME, weights_only=False)
    assert ckpt["baselines"] == {} and ckpt["stage"] == "joint"
    train.set_seed(0)  # joint.main builds its model after the same call (loading data draws no random numbers)
    fresh = dict(UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).named_parameters())
    for head in ("seg_head", "det_head", "cls_head"):  # parameters only: BatchNorm buffers move without learning
        assert not all(torch.equal(ckpt["model"][k], fresh[k]) for k in fresh if k.startswith(head)), head
    kept = max(records, key=lambda r: r["mean_score"])
    assert ckpt["epoch"] == kept["epoch"]
    report = eval_script.main(["--weights", str(tmp_path / joint.CHECKPOINT_NAME), "--data_root", str(demo_root),
                               "--tasks", "all"])
    for name in ("mIoU", "mAP_50", "top1"):
        assert report["metrics"][name] == pytest.approx(kept[name])
    assert "(no baseline)" in capsys.readouterr().out
    # A second run into the same folder is refused and leaves the first one's files as they were.
    before = (tmp_path / "joint_log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        joint.main(["--data_root", str(demo_root), "--out_dir", str(tmp_path), *JOINT_TINY, "--epochs", "1"])
    assert (tmp_path / "joint_log.jsonl").read_bytes() == before


def test_train_refuses_to_overwrite_an_earlier_run(demo_root, tmp_path):
    (tmp_path / "model_s1_best.pt").write_bytes(b"an earlier run's checkpoint")
    with pytest.raises(SystemExit, match="model_s1_best.pt exists.*--resume"):
        run_train(demo_root, tmp_path)
    assert (tmp_path / "model_s1_best.pt").read_bytes() == b"an earlier run's checkpoint"
    assert not (tmp_path / "training_log.jsonl").exists()


def test_single_task_reference_trains_only_that_task(demo_root, tmp_path):
    detection_only = tmp_path / "data"  # the other tasks' folders are not needed
    shutil.copytree(demo_root / "mini_coco_det", detection_only / "mini_coco_det")
    joint.main(["--data_root", str(detection_only), "--out_dir", str(tmp_path), *JOINT_TINY, "--epochs", "1",
                "--tasks", "det"])
    record = json.loads((tmp_path / "joint_log.jsonl").read_text())
    assert record["tasks"] == ["det"] and "mAP_50" in record and "mIoU" not in record and "top1" not in record
    assert {"det", "det_box"} <= set(record["losses"]) and not {"seg", "cls"} & set(record["losses"])
    trained = torch.load(tmp_path / joint.CHECKPOINT_NAME, weights_only=False)["model"]
    # The heads of the tasks not listed got no gradient: they are still at their initialisation.
    train.set_seed(0)  # joint.main builds its model right after the same call
    fresh = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).state_dict()
    for name in ("seg_head", "cls_head", "det_head"):
        same = all(torch.equal(trained[k], fresh[k]) for k in fresh if k.startswith(name))
        assert same == (name != "det_head"), name
