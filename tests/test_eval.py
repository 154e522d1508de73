"""eval.py and plot_log.py end to end on the outputs of a tiny train.py run, and their error cases."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import eval as eval_script
import plot_log
import summarize
from datasets import build_dataset
from metrics import evaluate

@pytest.fixture
def trained(tiny_run):
    """The folder of the session's tiny train.py run (conftest.tiny_run); tests only read it."""
    return tiny_run[0]


def test_eval_json_has_every_key_and_uses_checkpoint_baselines(trained, demo_root, tmp_path, capsys):
    json_path = tmp_path / "report.json"
    eval_script.main(["--weights", str(trained / "model_final_best_1pass.pt"), "--data_root", str(demo_root),
                      "--tasks", "all", "--json", str(json_path)])
    report = json.loads(json_path.read_text())
    assert set(report["metrics"]) == set(report["baselines"]) == {"mIoU", "mAP_50", "top1"}
    assert set(report["drops"]) == set(report["met"]) == {"mIoU", "mAP_50", "top1"}
    assert all(0.0 <= v <= 1.0 for v in report["metrics"].values())
    assert report["backbone"] == "efficientnet_lite0" and report["img_sizes"] == {"seg": 64, "det": 64, "cls": 64}
    ckpt = torch.load(trained / "model_final_best_1pass.pt", weights_only=False)
    assert report["baselines"] == ckpt["baselines"]
    # The final checkpoint's own task was scored in training exactly as eval.py scores it.
    assert report["metrics"]["top1"] == pytest.approx(ckpt["metrics"]["top1"])
    assert report["drops"]["top1"] == pytest.approx(0.0, abs=1e-6)
    table = capsys.readouterr().out
    assert "MET" in table and "mIoU" in table and "reference README's variant" in table
    # summarize.py reads the report as eval.py wrote it: one run, its numbers, no spread
    top1_row = next(line for line in summarize.main([str(json_path)]) if line.startswith("| cls |"))
    assert f"| {report['metrics']['top1']:.4f} (-) |" in top1_row and top1_row.endswith("| 1 of 1 |")


def test_baseline_flags_override_and_drop_formula(trained, demo_root, tmp_path):
    report = eval_script.main(["--weights", str(trained / "model_final_best_1pass.pt"), "--data_root",
                               str(demo_root), "--tasks", "cls", "--base_top1", "0.9"])
    final = report["metrics"]["top1"]
    assert report["baselines"] == {"top1": 0.9}
    assert report["drops"]["top1"] == pytest.approx((0.9 - final) / 0.9 * 100)
    assert report["met"]["top1"] == (report["drops"]["top1"] <= 5.0)
    assert set(report["metrics"]) == {"top1"}


def test_img_size_other_than_the_training_sizes_is_said_beside_the_drops(trained, demo_root, capsys):
    weights = ["--weights", str(trained / "model_final_best_1pass.pt"), "--data_root", str(demo_root), "--tasks", "cls"]
    report = eval_script.main(weights + ["--img_size", "96"])
    assert report["img_sizes"] == {"cls": 96} and report["trained_img_sizes"] == {"cls": 64}
    assert "baselines were measured at the training sizes (img_size 64), not at these" in capsys.readouterr().out
    eval_script.main(weights + ["--img_size", "64"])  # the training size: nothing to say
    assert "baselines were measured" not in capsys.readouterr().out


def test_bootstrap_flag_prints_an_interval_per_score(trained, demo_root, capsys):
    report = eval_script.main(["--weights", str(trained / "model_final_best_1pass.pt"), "--data_root",
                               str(demo_root), "--tasks", "seg,cls", "--bootstrap", "20"])
    for name in ("mIoU", "top1"):
        low, high = report["details"][f"{name}_ci95"]
        assert 0.0 <= low <= high <= 1.0
    assert capsys.readouterr().out.count("95% bootstrap interval") == 2
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--weights", "w.pt", "--bootstrap", "-1"])


def test_picture_flags_are_checked_before_anything_is_scored(tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    for flags, expected in ((["--num_vis", "0"], "--num_vis must be at least 1"),
                            (["--save_vis", str(a_file)], f"--save_vis {a_file}: a file")):
        with pytest.raises(SystemExit) as exit_info:
            eval_script.parse_args(["--weights", "w.pt", *flags])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_stage1_checkpoint_evaluates_seg_and_det_without_a_det_baseline(trained, demo_root):
    report = eval_script.main(["--weights", str(trained / "model_s1_best.pt"), "--data_root", str(demo_root),
                               "--tasks", "seg,det"])
    assert set(report["metrics"]) == {"mIoU", "mAP_50"} and set(report["baselines"]) == {"mIoU"}
    assert report["drops"]["mIoU"] == pytest.approx(0.0, abs=1e-6), "the stage-1 checkpoint is its own baseline"


def test_split_train_scores_the_training_images_without_drops(trained, demo_root, tmp_path, capsys):
    # Without its val images the data root can only be scored on its train split.
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    shutil.rmtree(root / "imagenette-160" / "val")
    weights = str(trained / "model_final_best_1pass.pt")
    report = eval_script.main(["--weights", weights, "--data_root", str(root), "--tasks", "cls", "--split", "train"])
    model, _ = eval_script.load_model(weights, torch.device("cpu"))
    expected = evaluate(model, build_dataset("cls", root, "train", 64, train=False), "cls")["top1"]
    assert report["metrics"]["top1"] == pytest.approx(expected)
    assert report["split"] == "train" and report["baselines"] == {} and report["drops"] == {}
    assert "train images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        eval_script.main(["--weights", weights, "--data_root", str(root), "--tasks", "cls"])  # val is gone
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--weights", weights, "--split", "train", "--base_top1", "0.9"])


def test_save_vis_writes_pictures(trained, demo_root, tmp_path):
    eval_script.main(["--weights", str(trained / "model_final_best_1pass.pt"), "--data_root", str(demo_root),
                      "--save_vis", str(tmp_path / "vis"), "--num_vis", "1"])
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == ["cls_00.png", "det_00.png", "seg_00.png"]


def test_plot_log_on_a_real_training_log(trained, tmp_path):
    written = plot_log.main(["--log", str(trained / "training_log.jsonl"), "--out_dir", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["forgetting_summary.png", "stage1_segmentation_metrics.png", "stage2_detection_metrics.png",
                     "stage3_classification_metrics.png"]
    assert len(written) == 4


def run_cli(*args):
    return subprocess.run([sys.executable, "eval.py", *args], capture_output=True, text=True, timeout=120,
                          cwd=eval_script.__file__.rsplit("/", 1)[0])


def test_help_shows_every_default_and_no_empty_one(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 0
    assert "(default: None)" not in text and "(default: 32)" in text and "(default: DL_data)" in text


def test_missing_weights_is_a_one_line_error(demo_root, tmp_path):
    result = run_cli("--weights", str(tmp_path / "nope.pt"), "--data_root", str(demo_root))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "nope.pt" in result.stderr


def exit_message(*argv):
    """eval.py's error, in process: (the SystemExit's code: a message or 2 for argparse)."""
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main([str(arg) for arg in argv])
    return exit_info.value.code


def assert_one_line_error(code, *names):
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert all(str(name) in code for name in names), code


def test_a_checkpoint_that_does_not_match_the_model_is_a_one_line_error(trained, demo_root, tmp_path):
    ckpt = torch.load(trained / "model_final_best_1pass.pt", weights_only=False)
    ckpt["model"]["seg_head.weight"] = torch.zeros(5, 256, 1, 1)
    torch.save(ckpt, tmp_path / "bad.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for name in ("bad.pt", "garbage.pt"):
        assert_one_line_error(exit_message("--weights", tmp_path / name, "--data_root", demo_root), name)
    # train.py's resume state is not a stage checkpoint: the message says which files are
    code = exit_message("--weights", trained / "last.pt", "--data_root", demo_root)
    assert_one_line_error(code, "last.pt", "resume state", "model_final_best_1pass.pt")


def test_unknown_task_and_bad_data_root_are_errors(trained, tmp_path, capsys):
    assert exit_message("--weights", trained / "model_final_best_1pass.pt", "--tasks", "seg,depth") == 2
    assert "--tasks" in capsys.readouterr().err
    code = exit_message("--weights", trained / "model_final_best_1pass.pt", "--data_root", tmp_path)
    assert_one_line_error(code, tmp_path)


def test_blend_flags_are_checked(trained, demo_root, tmp_path, capsys):
    final, s2 = trained / "model_final_best_1pass.pt", trained / "model_s2_best.pt"
    for flags in (["--blend_with", s2], ["--blend", "0.5"], ["--blend_with", s2, "--blend", "1.5"]):
        assert exit_message("--weights", final, "--data_root", demo_root, *flags) == 2
        assert "--blend_with CKPT and --blend ALPHA" in capsys.readouterr().err
    # a later stage's checkpoint is not an earlier one to blend toward
    code = exit_message("--weights", s2, "--blend_with", final, "--blend", "0.5", "--data_root", demo_root)
    assert_one_line_error(code, "--blend_with")
    # nor is a joint.py checkpoint (its stage is "joint"); a missing one is named by its own flag
    torch.save({**torch.load(s2, weights_only=False), "stage": "joint"}, tmp_path / "joint.pt")
    for path in (tmp_path / "joint.pt", tmp_path / "missing.pt"):
        code = exit_message("--weights", final, "--blend_with", path, "--blend", "0.5", "--data_root", demo_root)
        assert_one_line_error(code, f"--blend_with {path}")


def test_blend_1_is_the_checkpoint_and_blend_0_the_earlier_one_but_the_new_head(trained, demo_root):
    final, s2 = str(trained / "model_final_best_1pass.pt"), str(trained / "model_s2_best.pt")
    common = ["--data_root", str(demo_root), "--tasks", "seg,det"]
    plain = eval_script.main(["--weights", final, *common])
    assert eval_script.main(["--weights", final, "--blend_with", s2, "--blend", "1", *common])["metrics"] == \
        pytest.approx(plain["metrics"])
    earlier = eval_script.main(["--weights", s2, *common])  # seg and det use no cls head
    blended = eval_script.main(["--weights", final, "--blend_with", s2, "--blend", "0", *common])
    assert blended["metrics"] == pytest.approx(earlier["metrics"]) and blended["blend"] == 0
    own = eval_script.main(["--weights", final, "--blend_with", s2, "--blend", "0.5", "--data_root", str(demo_root),
                            "--tasks", "cls"])
    assert own["baselines"] == {}  # not the unblended model's own Top-1
