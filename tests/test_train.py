"""train.py: end to end on demo data, parameter groups, distillation, resume, NaN handling."""
import copy
import json
import logging
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import checkpoints
import eval as eval_script
import joint
import models
import options
import train
from datasets import build_dataset, classification_batch_mixing
from losses import distillation_loss, kl_with_temperature, soft_dice_loss, task_loss
from models import UnifiedMultiTaskModel
from tiny import TINY, epoch_log, run_train


def test_end_to_end_writes_every_output(tiny_run):
    out_dir, baselines = tiny_run
    for name in ("model_s1_best.pt", "model_s2_best.pt", "model_final_best_1pass.pt",
                 "training_log_single_pass.txt", "training_log.jsonl"):
        assert (out_dir / name).is_file(), name
    assert set(baselines) == {"mIoU", "mAP_50", "top1"}
    final = torch.load(out_dir / "model_final_best_1pass.pt", weights_only=False)
    assert final["backbone"] == "efficientnet_lite0" and final["img_sizes"] == {"seg": 64, "det": 64, "cls": 64}
    assert final["baselines"] == baselines
    assert set(final["class_names"]) == {"seg", "det", "cls"} and len(final["class_names"]["det"]) == 10
    s1 = torch.load(out_dir / "model_s1_best.pt", weights_only=False)
    assert set(s1["baselines"]) == {"mIoU"}


def test_jsonl_log_has_every_seen_task_per_epoch(tiny_run):
    out_dir, _ = tiny_run
    lines = [json.loads(line) for line in (out_dir / "training_log.jsonl").read_text().splitlines()]
    records = [r for r in lines if "kept_blend" not in r]
    assert [(r["stage"], r["epoch"]) for r in records] == [(1, 1), (2, 1), (2, 2), (3, 1)]
    for blend in (r for r in lines if "kept_blend" in r):  # a stage that kept a blend (the tiny stage 2 does)
        kept = torch.load(out_dir / checkpoints.CHECKPOINT_NAMES[blend["stage"]], weights_only=False)
        assert blend["kept_blend"] == kept["blend"] and blend["epoch"] == kept["epoch"]
        assert {m: blend[m] for m in kept["metrics"]} == kept["metrics"]
    expected = {1: {"mIoU"}, 2: {"mIoU", "mAP_50"}, 3: {"mIoU", "mAP_50", "top1"}}
    for record in records:
        assert expected[record["stage"]] <= set(record)
        assert {"stage", "task", "epoch", "losses", "lr"} <= set(record)
        for key in expected[record["stage"]]:
            assert 0.0 <= record[key] <= 1.0
    stage3 = records[-1]
    assert stage3["task"] == "cls" and {"distill_seg", "distill_det", "distill_feat"} <= set(stage3["losses"])


def test_parameter_groups_cover_every_parameter_once():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    groups = train.parameter_groups(model, ["det"], ["seg"], options.LR_FACTORS[2], base_lr=1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    lr = {g["name"]: g["lr"] for g in groups}
    assert lr["neck"] == pytest.approx(1e-3 * options.LR_FACTORS[2]["neck"])
    assert lr["shared_late"] == pytest.approx(1e-3 * options.LR_FACTORS[2]["shared_late"])
    assert lr["det_head"] == pytest.approx(1e-3 * options.LR_FACTORS[2]["task_head"])
    assert lr["seg_head"] == pytest.approx(1e-3 * options.LR_FACTORS[2]["distill_head"])
    # Factor 0 freezes: the default table freezes the backbone; a task not learned yet is not trained.
    assert not set(options.BACKBONE_MODULES) & set(lr) and "cls_head" not in lr
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.cls_head.parameters())
    # Stage 1's table trains the backbone again: freezing is per stage, not permanent.
    groups = train.parameter_groups(model, ["seg"], [], options.LR_FACTORS[1], base_lr=1e-3)
    assert {g["name"] for g in groups} >= {*options.BACKBONE_MODULES, "seg_head"}
    assert all(p.requires_grad for p in model.backbone.parameters())
    # The learning stage-3 backbone option (RESULTS.md, session 25): `backbone` sets both parts,
    # each gets its group and LR, and the BatchNorm statistics stay ImageNet's.
    factors = options.parse_args(["--lr_factor", "3", "backbone", "0.1"]).lr_factors[3]
    lr = {g["name"]: g["lr"] for g in train.parameter_groups(model, ["cls"], ["seg", "det"], factors, 1e-3)}
    assert lr["backbone_early"] == lr["backbone_late"] == pytest.approx(1e-4)
    train.set_train_mode(model, "cls", ["seg", "det"])
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    # The default stage 3 (RESULTS.md, session 26): only the stride-32 blocks learn.
    train.parameter_groups(model, ["cls"], ["seg", "det"], options.LR_FACTORS[3], 1e-3)
    assert all(p.requires_grad for p in model.backbone.to_s32.parameters())
    assert not any(p.requires_grad for p in model.backbone.to_s16.parameters())


def test_batchnorm_statistics_of_learned_tasks_stay_frozen():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    train.set_train_mode(model, "det", ["seg"])
    assert not model.neck[0][1].training and not model.shared_conv3[1].training
    assert model.det_head[1].training, "the primary head's BatchNorm learns"
    before = model.shared_conv3[1].running_mean.clone()
    model(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, model.shared_conv3[1].running_mean)
    # Replay images of other tasks do not move the primary head's statistics either.
    head_before = model.det_head[1].running_mean.clone()
    with train.batchnorm_statistics_frozen(model):
        model(torch.rand(2, 3, 64, 64))
    assert torch.equal(head_before, model.det_head[1].running_mean) and model.det_head[1].training


def test_backbone_statistics_learn_in_stage_1_only_without_imagenet_weights():
    def backbone_norms_learning(model):
        return {m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)}

    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    train.set_train_mode(model, "seg", [])
    assert backbone_norms_learning(model) == {False}, "ImageNet statistics stay"
    train.set_train_mode(model, "seg", [], imagenet_statistics=False)
    assert backbone_norms_learning(model) == {True}, "a --no-pretrained backbone learns its own in stage 1"
    train.set_train_mode(model, "det", ["seg"], imagenet_statistics=False)
    assert backbone_norms_learning(model) == {False}, "and keeps them once segmentation has been learned"


@pytest.mark.parametrize("task", ["seg", "det", "cls"])
def test_distillation_is_zero_when_student_equals_teacher(task):
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval()
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 64))
    weights = {"seg": 4.0, "det_logits": 5.0, "det_feature": 2.5, "cls": 1.0}
    loss, _ = distillation_loss(task, outputs, outputs, weights, temperature=2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    other = {k: v + torch.randn_like(v) for k, v in outputs.items()}
    assert distillation_loss(task, other, outputs, weights, temperature=2.0)[0].item() > 1e-3


def one_cls_step_with_a_teacher(model, teacher, images, args=(), **distillation):
    """One SGD step of a copy of `model` on a classification batch of `images`, with `teacher`
    (or None) and the new-images distillation keyword arguments of train_one_epoch; returns
    (losses, the stepped copy)."""
    student = copy.deepcopy(model)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = {"cls": (images, torch.tensor([1, 7]), None)}
    losses = train.train_one_epoch(student, [batch], {}, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                   options.parse_args(list(args)), torch.device("cpu"), None, teacher=teacher,
                                   **distillation)
    return losses, student


def test_a_step_with_a_teacher_distils_segmentation_on_the_primary_images():
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.seg_head.bias.add_(torch.linspace(-3, 3, 21))  # the teacher now disagrees
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)

    def step(weight, with_teacher=True):
        return one_cls_step_with_a_teacher(model, teacher if with_teacher else None, images,
                                           seg_new_images_weight=weight)

    off, _ = step(0.0)
    assert "distill_seg_new" not in off, "weight 0 is off"
    on, student = step(4.0)
    assert on["distill_seg_new"] > 1e-3 and on["total"] == pytest.approx(off["total"] + on["distill_seg_new"],
                                                                          rel=1e-4)
    # The replay batches' segmentation KL, on the primary images, at weight 4.
    with torch.no_grad():
        expected, _ = distillation_loss("seg", copy.deepcopy(model)(model.prepare_input(images)),
                                        teacher(teacher.prepare_input(images)), {"seg": 4.0}, temperature=2.0)
    assert on["distill_seg_new"] == pytest.approx(expected.item(), rel=1e-4)
    assert not torch.equal(student.seg_head.bias, model.seg_head.bias), "the seg head is pulled"
    assert "distill_seg_new" not in step(4.0, with_teacher=False)[0]


def test_a_step_with_a_teacher_distils_detection_on_the_primary_images():
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.det_head[-1].bias.add_(torch.linspace(-3, 3, 15))  # the teacher now disagrees
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)

    def step(weight):
        return one_cls_step_with_a_teacher(model, teacher, images, seg_new_images_weight=0.0,
                                           det_new_images_weight=weight)

    off, _ = step(0.0)
    assert "distill_det_new" not in off and "distill_seg_new" not in off
    on, student = step(5.0)
    with torch.no_grad():  # the replay batches' detection output MSE, on the primary images, at weight 5
        expected, _ = distillation_loss("det", copy.deepcopy(model)(model.prepare_input(images)),
                                        teacher(teacher.prepare_input(images)),
                                        {"det_logits": 5.0, "det_feature": 0.0}, temperature=2.0)
    assert on["distill_det_new"] > 1e-3 and on["distill_det_new"] == pytest.approx(expected.item(), rel=1e-4)
    assert on["total"] == pytest.approx(off["total"] + on["distill_det_new"], rel=1e-4)
    assert not torch.equal(student.det_head[-1].bias, model.det_head[-1].bias), "the det head is pulled"


def test_stage_3_distils_detection_and_the_backbone_probe_on_its_images_by_default_and_0_turns_them_off(
        demo_root, tmp_path):
    run_train(demo_root, tmp_path / "default")
    run_train(demo_root, tmp_path / "off", "--distill_det_new_images", "0", "--distill_backbone_probe", "0")
    for run, in_stage_3 in (("default", True), ("off", False)):
        records = epoch_log(tmp_path / run)
        for term in ("distill_det_new", "distill_probe"):  # detection is learned in stage 2, so never before 3
            assert [(term in r["losses"]) for r in records] == [False, False, in_stage_3], (run, term)


def test_a_step_with_a_backbone_probe_distils_classification_toward_it():
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    probe_weight = torch.randn(1280, 10)
    probe = lambda pooled: pooled.float() @ probe_weight  # noqa: E731  (a stand-in for the fitted probe)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)

    def step(backbone_probe):
        return one_cls_step_with_a_teacher(model, teacher, images, ["--distill_backbone_probe", "3"],
                                           backbone_probe=backbone_probe)

    off, _ = step(None)
    assert "distill_probe" not in off
    on, student = step(probe)
    with torch.no_grad():  # KL at the distillation temperature toward the probe of the teacher's backbone, x 3
        teacher_outputs = teacher(teacher.prepare_input(images))
        expected = 3 * kl_with_temperature(copy.deepcopy(model)(model.prepare_input(images))["cls"],
                                           probe(teacher_outputs["backbone_pooled"]), 2.0)
    assert on["distill_probe"] > 1e-3 and on["distill_probe"] == pytest.approx(expected.item(), rel=1e-4)
    assert on["total"] == pytest.approx(off["total"] + on["distill_probe"], rel=1e-4)
    assert not torch.equal(student.cls_head.bias, model.cls_head.bias)


def test_the_backbone_probe_is_fitted_on_the_teachers_pooled_backbone_features(demo_root):
    torch.manual_seed(0)
    teacher = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval().requires_grad_(False)
    dataset = build_dataset("cls", demo_root, "train", 64)
    probe = train.fit_backbone_probe(teacher, dataset, None, logging.getLogger("test"))
    images = dataset.images_uint8()
    labels = torch.tensor([dataset.eval_target(i) for i in range(len(dataset))])
    with torch.no_grad():
        logits = probe(teacher(teacher.prepare_input(images))["backbone_pooled"])
    assert logits.shape == (len(dataset), len(dataset.class_names))
    assert torch.equal(logits.argmax(1), labels), "1280 features fit a handful of training images"


def test_backbone_probe_imagenet_distils_toward_the_backbones_imagenet_classifier(demo_root, tmp_path):
    # the whole pipeline with the pretrained Lite0 (the tiny runs use random weights)
    pretrained = [flag for flag in TINY if flag != "--no-pretrained"]
    train.main(["--data_root", str(demo_root), "--out_dir", str(tmp_path), *pretrained, "--backbone_probe", "imagenet"])
    log = (tmp_path / "training_log_single_pass.txt").read_text()
    assert "backbone probe: the ImageNet classifier of efficientnet_lite0, rows of 10 classes" in log
    records = epoch_log(tmp_path)
    assert "distill_probe" in records[-1]["losses"]
    # the probe it distils toward: the classifier's rows of the dataset's classes on the pooled backbone
    teacher = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=True).eval()
    dataset = build_dataset("cls", demo_root, "train", 64)
    args = options.parse_args(["--backbone", "efficientnet_lite0", "--backbone_probe", "imagenet"])
    probe = train.new_images_distillation(args, 3, "cls", ["seg", "det"], teacher, {"cls": dataset}, None,
                                          logging.getLogger("test"))["backbone_probe"]
    weight, bias = models.imagenet_classifier("efficientnet_lite0", dataset.wnids)
    pooled = torch.randn(3, 1280)
    assert torch.allclose(probe(pooled), pooled @ weight.T + bias)


def test_backbone_probe_imagenet_needs_imagenet_classes_and_weights(broken_copy, tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # TINY has --no-pretrained
        run_train(broken_copy, tmp_path / "random", "--backbone_probe", "imagenet")
    assert str(exit_info.value) == ("error: --backbone_probe imagenet: the ImageNet classifier needs the pretrained "
                                    "backbone; drop --no-pretrained or pass --backbone_probe fitted")
    for split in ("train", "val"):  # a class that is not an ImageNet wnid
        (broken_copy / "imagenette-160" / split / "n01440764").rename(broken_copy / "imagenette-160" / split / "fish")
    pretrained = [flag for flag in TINY if flag != "--no-pretrained"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data_root", str(broken_copy), "--out_dir", str(tmp_path / "fish"), *pretrained,
                    "--backbone_probe", "imagenet"])
    message = str(exit_info.value)
    assert message.startswith("error: --backbone_probe imagenet:") and "\n" not in message
    assert "'fish' is not an ImageNet-1k wnid" in message and str(broken_copy / "imagenette-160" / "train") in message
    assert not (tmp_path / "fish" / "model_s1_best.pt").exists(), "it stops before training"


def test_distill_seg_new_images_takes_one_weight_or_one_per_stage():
    assert options.parse_args([]).distill_seg_new_images == {2: 4.0, 3: 1.0}, "the default: 4 in stage 2, 1 in stage 3"
    assert options.parse_args(["--distill_seg_new_images", "0"]).distill_seg_new_images == {2: 0.0, 3: 0.0}
    assert options.parse_args(["--distill_seg_new_images", "4"]).distill_seg_new_images == {2: 4.0, 3: 4.0}
    assert options.parse_args(["--distill_seg_new_images", "4", "1"]).distill_seg_new_images == {2: 4.0, 3: 1.0}


def test_label_smoothing_moves_the_classification_target_off_one_hot():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    labels = torch.tensor([0, 1])
    plain, _ = task_loss("cls", {"cls": logits}, labels)
    smoothed, _ = task_loss("cls", {"cls": logits}, labels, {"label_smoothing": 0.1})
    # eps spreads its mass evenly over the 3 classes: loss = (1 - eps) * CE(true) + eps * mean CE(all)
    log_p = torch.log_softmax(logits, 1)
    expected = -(0.9 * log_p[[0, 1], labels] + 0.1 * log_p.mean(1)).mean()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-5) and smoothed > plain


def test_soft_dice_loss_counts_each_present_class_once_and_ignores_void():
    targets = torch.tensor([[[0, 1, 1, 255]]])  # one row of 4 pixels: class 0, class 1 twice, void
    confident = torch.full((1, 21, 1, 4), -30.0)
    for pixel, label in enumerate([0, 1, 1, 3]):  # the void pixel's prediction must not matter
        confident[0, label, 0, pixel] = 30.0
    assert soft_dice_loss(confident, targets).item() == pytest.approx(0.0, abs=1e-6)
    # class 0's pixel predicted as class 1: Dice(0) = 0, Dice(1) = 2*2 / (3 + 2); classes absent from targets do not count
    confident[0, :, 0, 0] = confident[0, :, 0, 1]
    assert soft_dice_loss(confident, targets).item() == pytest.approx(1 - (0 + 0.8) / 2, rel=1e-5)
    uniform = torch.zeros(1, 21, 1, 4, requires_grad=True)
    soft_dice_loss(uniform, targets).backward()
    assert uniform.grad[0, :, 0, :3].abs().sum() > 0 and uniform.grad[0, :, 0, 3].abs().sum() == 0


def test_seg_dice_weight_adds_the_weighted_dice_term_to_cross_entropy():
    torch.manual_seed(0)
    outputs, targets = {"seg": torch.randn(2, 21, 8, 8)}, torch.randint(0, 21, (2, 8, 8))
    plain, _ = task_loss("seg", outputs, targets)
    combined, parts = task_loss("seg", outputs, targets, {"dice_weight": 0.5})
    dice = soft_dice_loss(outputs["seg"], targets)
    assert combined.item() == pytest.approx(plain.item() + 0.5 * dice.item(), rel=1e-5)
    assert parts["seg_dice"].item() == pytest.approx(dice.item()) and parts["seg"].item() == pytest.approx(combined.item())


def test_a_step_backpropagates_each_task_and_equals_the_summed_loss_step():
    """train_one_epoch backpropagates one task at a time; the step must be the summed loss's."""
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    twin = copy.deepcopy(model)
    args = options.parse_args(["--label_smoothing", "0.1", "--seg_dice_weight", "0.5"])
    batch = {"seg": (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.randint(0, 21, (2, 64, 64)), None),
             "cls": (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([1, 7]), None)}
    device = torch.device("cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = train.train_one_epoch(model, [batch], {}, optimizer, scaler, args, device, None)

    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    summed = sum(task_loss(task, twin(twin.prepare_input(images)), targets,
                           {"label_smoothing": 0.1} if task == "cls" else {"dice_weight": 0.5})[0]
                 for task, (images, targets, _) in batch.items())
    summed.backward()
    twin_optimizer.step()
    assert losses["total"] == pytest.approx(summed.item(), rel=1e-5)
    for (name, after), twin_after in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.allclose(after.float(), twin_after.float(), atol=1e-6), name


def test_cutmix_trains_the_classification_batch_on_mixed_images_and_soft_labels():
    """--cls_cutmix: the step is the one on the mixed batch (same random draw), not on the plain one."""
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    args = options.parse_args(["--cls_cutmix", "1.0"])
    images, labels = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), torch.tensor([1, 7, 3, 3])
    device, scaler = torch.device("cpu"), torch.amp.GradScaler("cpu", enabled=False)
    model.eval()  # BatchNorm on its running statistics: the three losses below see the same model
    with torch.no_grad():
        model.cls_head.weight.mul_(100)  # confident logits, so the targets change the loss
    torch.manual_seed(1)
    loss = train.train_one_epoch(model, [{"cls": (images, labels, None)}], {},
                                 torch.optim.SGD(model.parameters(), lr=0.0), scaler, args, device, None)["cls"]
    torch.manual_seed(1)
    mixed, soft = classification_batch_mixing(0.0, 1.0, 10)(model.prepare_input(images), labels)
    with torch.no_grad():
        expected = task_loss("cls", model(mixed), soft)[0]
        plain = task_loss("cls", model(model.prepare_input(images)), labels)[0]
    assert soft.shape == (4, 10) and loss == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss - plain.item()) > 1e-4


@pytest.mark.parametrize("extra", [["--ema_decay", "0"], []], ids=["raw_weights", "weight_average"])
def test_resume_after_an_interruption_gives_the_same_outputs(demo_root, tmp_path, extra):
    # --select_window 2: the recent scores it averages must survive the interruption too (and so
    # must the weight average)
    flags = ["--epochs_det", "2", "--select_window", "2", *extra]
    straight = tmp_path / "straight"
    run_train(demo_root, straight, *flags)
    resumed = tmp_path / "resumed"
    with pytest.raises(SystemExit):   # killed after stage 1 and one detection epoch
        run_train(demo_root, resumed, *flags, "--stop_after_epochs", "2")
    assert (resumed / "model_s1_best.pt").exists() and not (resumed / "model_final_best_1pass.pt").exists()
    with pytest.raises(SystemExit):   # killed again: a resumed run counts only its own epochs
        run_train(demo_root, resumed, *flags, "--resume", "--stop_after_epochs", "1")
    assert len(epoch_log(resumed)) == 3
    run_train(demo_root, resumed, *flags, "--resume")
    a = torch.load(straight / "model_final_best_1pass.pt", weights_only=False)
    b = torch.load(resumed / "model_final_best_1pass.pt", weights_only=False)
    assert a["baselines"] == b["baselines"] and a["metrics"] == b["metrics"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_resume_inside_stage_1_keeps_the_first_runs_no_pretrained(demo_root, tmp_path, monkeypatch):
    # A --no-pretrained backbone learns its BatchNorm statistics in stage 1; a resume that omits
    # the flag (allowed: the weights come from last.pt, so no ImageNet file is read) must go on doing so.
    flags = ["--epochs_seg", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with pytest.raises(SystemExit):
        run_train(demo_root, straight, *flags, "--stop_after_epochs", "2")
    with pytest.raises(SystemExit):
        run_train(demo_root, resumed, *flags, "--stop_after_epochs", "1")
    without_flag = [arg for arg in TINY if arg != "--no-pretrained"]

    def no_weights_file():
        raise models.PretrainedWeightsError("the test: a resume must not need the ImageNet file")

    monkeypatch.setattr(models, "load_lite0_imagenet_state_dict", no_weights_file)
    with pytest.raises(SystemExit, match="stopped after 1 epochs"):
        train.main(["--data_root", str(demo_root), "--out_dir", str(resumed), *without_flag, *flags,
                    "--resume", "--stop_after_epochs", "1"])
    a = torch.load(straight / "last.pt", weights_only=False)["model"]
    b = torch.load(resumed / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(tensor, b[name]) for name, tensor in a.items())


def test_demo_writes_its_data_beside_the_run_and_never_over_an_earlier_one(tmp_path):
    out_dir = tmp_path / "demo"
    with pytest.raises(SystemExit):  # one epoch is enough to see where everything goes
        train.main(["--demo", "--out_dir", str(out_dir), "--stop_after_epochs", "1"])
    data = out_dir / "demo_data"
    assert len(list((data / "imagenette-160" / "val").rglob("*.JPEG"))) == 24
    assert torch.load(out_dir / "last.pt", weights_only=False)["args"]["data_root"] == str(data)
    image = next((data / "mini_voc_seg" / "JPEGImages").iterdir())
    image.unlink()
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--demo", "--out_dir", str(out_dir)])
    assert "already holds a run" in str(exit_info.value) and not image.exists(), "nothing rewritten"


def test_demo_into_a_folder_with_other_data_is_a_one_line_error(tmp_path):
    (tmp_path / "demo_data" / "mini_voc_seg").mkdir(parents=True)  # not written by demo_data.py
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--demo", "--out_dir", str(tmp_path)])
    assert str(exit_info.value).startswith("error: ") and ".onehead_demo" in str(exit_info.value)


def test_resume_without_a_previous_run_is_a_clear_error(demo_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, tmp_path, "--resume")
    assert "last.pt" in str(exit_info.value) and "not found" in str(exit_info.value)


def test_a_nan_loss_stops_cleanly_and_keeps_earlier_checkpoints(demo_root, tmp_path, monkeypatch):
    real_task_loss = train.task_loss

    def nan_in_detection(task, outputs, targets, options=None):
        loss, parts = real_task_loss(task, outputs, targets, options)
        return (loss * float("nan"), parts) if task == "det" else (loss, parts)

    monkeypatch.setattr(train, "task_loss", nan_in_detection)
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, tmp_path)
    message = str(exit_info.value)
    assert "non-finite" in message and "intact" in message
    stage1 = torch.load(tmp_path / "model_s1_best.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in stage1["model"].values() if v.is_floating_point())
    assert not (tmp_path / "model_s2_best.pt").exists()


@pytest.mark.parametrize("script, flags, fast", [(train, [], True), (train, ["--baseline_mode"], False),
                                                  (joint, [], True)])
def test_only_baseline_mode_turns_off_the_image_cache_and_channels_last(script, flags, fast, demo_root, tmp_path,
                                                                        monkeypatch):
    asked = {}

    def load_data(args, cache=True, tasks=None):
        asked["cache"] = cache
        return {}

    def build_model(args, device, channels_last=True, imagenet_weights=True):
        asked["channels_last"] = channels_last
        raise ValueError("stopped by the test")  # both scripts turn it into a one-line exit

    monkeypatch.setattr(train, "load_data", load_data)
    monkeypatch.setattr(train, "build_model", build_model)
    with pytest.raises(SystemExit, match="stopped by the test"):
        script.main(["--data_root", str(demo_root), "--out_dir", str(tmp_path), *flags])
    assert asked == {"cache": fast, "channels_last": fast}


def test_start_from_a_stage_checkpoint_runs_only_the_later_stages(tiny_run, demo_root, tmp_path):
    out_dir, baselines = tiny_run
    run_train(demo_root, tmp_path, "--start_from", str(out_dir / "model_s1_best.pt"),
              "--distill_seg_new_images", "4", "0")
    records = epoch_log(tmp_path)
    assert [r["stage"] for r in records] == [2, 3]
    assert ["distill_seg_new" in r["losses"] for r in records] == [True, False], "stage 2 only: weights 4 and 0"
    final = torch.load(tmp_path / "model_final_best_1pass.pt", weights_only=False)
    assert final["baselines"]["mIoU"] == baselines["mIoU"], "the stage-1 baseline carries over"


@pytest.mark.parametrize("flags", [["--epochs_det", "0"], ["--img_size", "100"], ["--img_size_cls", "0"],
                                   ["--batch_size", "0"],
                                   ["--det_scale_jitter", "1.5,0.5"], ["--cls_scale_jitter", "big"],
                                   ["--lr_factor", "4", "neck", "0.1"], ["--lr_factor", "3", "head", "0.1"],
                                   ["--lr_factor", "3", "neck", "fast"], ["--lr_factor", "3", "neck", "-1"],
                                   ["--select_window", "0"], ["--label_smoothing", "1"],
                                   ["--label_smoothing", "-0.1"], ["--ema_decay", "1"], ["--ema_decay", "-0.1"],
                                   ["--cls_mixup", "-1"], ["--cls_cutmix", "-0.5"], ["--seg_dice_weight", "-1"],
                                   ["--det_mosaic", "1.5"], ["--det_mosaic", "-0.1"],
                                   ["--distill_seg_new_images", "-1"],
                                   ["--distill_seg_new_images", "4", "1", "1"], ["--batch_size", "8", "8"],
                                   ["--replay_batch_size", "0"], ["--replay_batch_size", "8", "2", "2"],
                                   ["--demo", "--replay_batch_size", "2"], ["--blend_steps", "-1"],
                                   ["--blend_steps", "1"], ["--demo", "--epochs_seg", "2"],
                                   ["--demo", "--img_size_cls", "64"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(flags)
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_no_pretrained_takes_either_spelling():  # every other flag is spelled with underscores
    assert not options.parse_args(["--no-pretrained"]).pretrained and not options.parse_args(["--no_pretrained"]).pretrained


@pytest.mark.parametrize("sequential", [True, False], ids=["train.py", "joint.py"])
def test_help_describes_every_flag_and_shows_only_real_defaults(sequential):
    parser = options.build_parser(sequential=sequential)
    assert [a.option_strings for a in parser._actions if not a.help] == []
    text = " ".join(parser.format_help().split())
    assert not any(f"(default: {v})" in text for v in ("None", "[]", "True", "False"))
    assert "epochs of stage 1, segmentation (default: 30)" in text
    assert "input size of the segmentation images (default: 416)" in text


def test_img_size_flags_set_every_task_or_one():
    assert options.parse_args([]).img_sizes == options.IMG_SIZES
    assert options.parse_args(["--img_size", "256"]).img_sizes == {"seg": 256, "det": 256, "cls": 256}
    args = options.parse_args(["--img_size", "256", "--img_size_cls", "160"])
    assert args.img_sizes == {"seg": 256, "det": 256, "cls": 160}, "a task's own flag wins over --img_size"
    assert options.parse_args(["--img_size_det", "416"]).img_sizes == {**options.IMG_SIZES, "det": 416}


def test_batch_size_flags_set_every_stage_or_one_each():
    args = options.parse_args([])
    assert args.batch_size == options.BATCH_SIZES and args.replay_batch_size == options.REPLAY_BATCH_SIZES
    args = options.parse_args(["--batch_size", "16", "--replay_batch_size", "4"])
    assert args.batch_size == {1: 16, 2: 16, 3: 16} and args.replay_batch_size == {2: 4, 3: 4}
    args = options.parse_args(["--batch_size", "32", "16", "8", "--replay_batch_size", "8", "1"])
    assert args.batch_size == {1: 32, 2: 16, 3: 8} and args.replay_batch_size == {2: 8, 3: 1}
    demo = options.parse_args(["--demo"])
    assert demo.batch_size == {1: 8, 2: 8, 3: 8} and demo.replay_batch_size == {2: 8, 3: 8}


def test_each_stage_trains_at_its_own_batch_size(tiny_run, demo_root, tmp_path, monkeypatch):
    loader_sizes, replay_sizes = [], []
    original_loader, original_sample = train.make_loader, train.ReplayBank.sample

    def make_loader(dataset, batch_size, *args, **kwargs):
        loader_sizes.append((dataset.task, batch_size))
        return original_loader(dataset, batch_size, *args, **kwargs)

    def sample(bank, batch_size):
        replay_sizes.append((bank.dataset.task, batch_size))
        return original_sample(bank, batch_size)

    monkeypatch.setattr(train, "make_loader", make_loader)
    monkeypatch.setattr(train.ReplayBank, "sample", sample)
    run_train(demo_root, tmp_path, "--start_from", str(tiny_run[0] / "model_s1_best.pt"),
              "--batch_size", "4", "4", "2", "--replay_batch_size", "3", "1")
    assert set(loader_sizes) == {("det", 4), ("cls", 2)}
    assert set(replay_sizes) == {("seg", 3), ("seg", 1), ("det", 1)}
    log = (tmp_path / "training_log_single_pass.txt").read_text()
    assert "batch 4 + 3 of each earlier task" in log and "batch 2 + 1 of each earlier task" in log


def test_checkpoint_img_sizes_reads_old_single_size_checkpoints():
    assert checkpoints.checkpoint_img_sizes({"img_size": 224}) == {"seg": 224, "det": 224, "cls": 224}
    sizes = {"seg": 320, "det": 320, "cls": 224}
    assert checkpoints.checkpoint_img_sizes({"img_sizes": sizes, "img_size": None}) == sizes


def test_each_task_trains_and_validates_at_its_own_size(tiny_run, demo_root, tmp_path):
    # --start_from a stage-1 checkpoint: later tasks may change their size, finished ones may not
    out_dir, _ = tiny_run
    run_train(demo_root, tmp_path, "--start_from", str(out_dir / "model_s1_best.pt"), "--img_size_cls", "96")
    final = torch.load(tmp_path / "model_final_best_1pass.pt", weights_only=False)
    assert final["img_sizes"] == {"seg": 64, "det": 64, "cls": 96}
    log = (tmp_path / "training_log_single_pass.txt").read_text()
    assert "img_size seg 64 / det 64 / cls 96" in log
    # eval.py reads each task's size from the checkpoint and scores as training-time validation did
    report = eval_script.main(["--weights", str(tmp_path / "model_final_best_1pass.pt"), "--data_root",
                               str(demo_root), "--tasks", "all"])
    assert report["img_sizes"] == final["img_sizes"]
    assert report["metrics"]["top1"] == pytest.approx(final["metrics"]["top1"])
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, tmp_path / "other", "--start_from", str(out_dir / "model_s1_best.pt"),
                  "--img_size_seg", "96")
    assert "--start_from" in str(exit_info.value) and "img_size 64" in str(exit_info.value)


def test_start_from_a_final_joint_or_resume_checkpoint_is_a_clear_error(tiny_run, demo_root, tmp_path):
    joint = tmp_path / "joint.pt"
    torch.save({"stage": "joint", "model": {}, "backbone": "efficientnet_lite0"}, joint)
    for path, expected in ((tiny_run[0] / "model_final_best_1pass.pt", "holds stage 3"),
                           (joint, "holds stage 'joint'"), (tiny_run[0] / "last.pt", "--resume")):
        with pytest.raises(SystemExit) as exit_info:
            run_train(demo_root, tmp_path / "run", "--start_from", str(path))
        message = str(exit_info.value)
        assert f"--start_from {path}: " in message and expected in message and "model_s2_best.pt" in message
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")  # read as eval.py reads --weights
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, tmp_path / "run", "--start_from", str(tmp_path / "garbage.pt"))
    assert f"--start_from {tmp_path / 'garbage.pt'}: not a readable checkpoint" in str(exit_info.value)


def test_lr_factor_overrides_one_entry_of_one_stage():
    args = options.parse_args(["--lr_factor", "3", "neck", "0.5", "--lr_factor", "1", "backbone", "0"])
    assert args.lr_factors[3]["neck"] == 0.5
    assert args.lr_factors[1]["backbone_early"] == args.lr_factors[1]["backbone_late"] == 0.0, "backbone: both parts"
    assert args.lr_factors[2] == options.LR_FACTORS[2], "other stages keep their defaults"
    assert options.LR_FACTORS[3]["neck"] != 0.5, "the module-level table is not modified"


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_lr_schedules(schedule):
    args = options.parse_args(["--lr_schedule", schedule, "--plateau_patience", "2"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = train.make_scheduler(optimizer, args, epochs=10)
    lrs = []
    for _ in range(10):  # a score that never improves
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # as in training: the optimizer steps before the schedule does
        train.step_scheduler(scheduler, 0.5)
    if schedule == "plateau":  # halved after the first epoch plus 2 without a better score
        assert lrs[:4] == [1.0] * 4 and lrs[4] == 0.5
    else:  # falls every epoch, towards 0 at the end of the stage
        assert lrs[0] == 1.0 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.03


def test_cosine_schedule_restarts_in_every_stage(demo_root, tmp_path):
    run_train(demo_root, tmp_path, "--lr_schedule", "cosine", "--epochs_det", "2")
    records = epoch_log(tmp_path)
    det = [r["lr"] for r in records if r["task"] == "det"]
    assert det[0] == pytest.approx(options.parse_args([]).lr_det) and det[1] < det[0]
    assert [r["lr"] for r in records if r["task"] == "cls"] == [pytest.approx(1e-3)]


@pytest.fixture(scope="module")
def interrupted_run(demo_root, tmp_path_factory):
    """A run stopped after its first epoch (last.pt written), for tests that resume a copy of it."""
    out_dir = tmp_path_factory.mktemp("interrupted")
    with pytest.raises(SystemExit):
        run_train(demo_root, out_dir, "--stop_after_epochs", "1")
    return out_dir


@pytest.mark.parametrize("flag, value, saved", [("--lr_schedule", "cosine", "plateau"), ("--ema_decay", "0.9", "0.95"),
                                               ("--distill_seg_new_images", "2", "4 1"),
                                               ("--distill_backbone_probe", "0", "1"), ("--blend_steps", "0", "20"),
                                               ("--lr_factor", "3 shared_late 0.5",
                                                f"3 shared_late {options.LR_FACTORS[3]['shared_late']:g}"),
                                               ("--lr_det", "1e-3", "0.003"), ("--seed", "1", "0"),
                                               ("--det_scale_jitter", "0.8,1.2", "0.5,1.5"),
                                               ("--batch_size", "4 4 2", "4 4 4"), ("--replay_batch_size", "1", "2 2")])
def test_resume_with_another_recipe_flag_is_a_clear_error(interrupted_run, demo_root, tmp_path, flag, value, saved):
    shutil.copytree(interrupted_run, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, tmp_path / "run", "--resume", flag, *value.split())
    assert f"{flag} {saved}" in str(exit_info.value)


@pytest.mark.parametrize("flags", [["--img_size_det", "96"], ["--backbone", "efficientnet_b0"]])
def test_resume_with_another_backbone_or_input_size_is_a_clear_error(interrupted_run, demo_root, tmp_path, flags):
    # checked as what they become (the backbone, each task's size), not flag by flag
    run = shutil.copytree(interrupted_run, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, run, "--resume", *flags)
    assert "was trained with backbone efficientnet_lite0 and img_size 64; pass the same flags" in str(exit_info.value)


def test_resume_error_writes_the_saved_flag_as_it_is_typed():
    assert checkpoints.as_flag("baseline_mode", True) == "with --baseline_mode"
    assert checkpoints.as_flag("seg_scale_jitter", None) == "without --seg_scale_jitter"
    assert checkpoints.as_flag("det_scale_jitter", (0.5, 1.5)) == "with --det_scale_jitter 0.5,1.5"
    assert checkpoints.as_flag("distill_seg_new_images", {2: 4.0, 3: 1.0}) == "with --distill_seg_new_images 4 1"
    assert checkpoints.as_flag("lr_det", 0.003) == "with --lr_det 0.003" and checkpoints.as_flag("seed", 2) == "with --seed 2"


def test_resume_may_run_a_stage_longer_and_move_the_data(interrupted_run, demo_root, tmp_path):
    run = shutil.copytree(interrupted_run, tmp_path / "run")
    moved = tmp_path / "moved_data"
    shutil.copytree(demo_root, moved)
    train.main(["--data_root", str(moved), "--out_dir", str(run), *TINY, "--resume", "--epochs_cls", "2"])
    records = epoch_log(run)
    assert [r["epoch"] for r in records if r["task"] == "cls"] == [1, 2]


def test_resume_of_a_run_saved_before_the_backbone_split_keeps_its_recipe(interrupted_run, demo_root, tmp_path):
    # Runs before session 26 saved one "backbone" factor (0 in stage 3, where the default now
    # lets the stride-32 blocks learn): resuming one reads it as both parts and stops at the change.
    run = shutil.copytree(interrupted_run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=False)
    for table in state["args"]["lr_factors"].values():
        table["backbone"] = table.pop("backbone_early")
        del table["backbone_late"]
    state["args"]["lr_factors"][3]["backbone"] = 0.0
    torch.save(state, run / "last.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, run, "--resume")
    assert "--lr_factor 3 backbone_late 0" in str(exit_info.value)
    run_train(demo_root, run, "--resume", "--lr_factor", "3", "backbone", "0")  # the old recipe goes on


def test_resume_of_a_run_saved_before_batch_sizes_were_per_stage_reads_one_for_every_stage(interrupted_run,
                                                                                          demo_root, tmp_path):
    run = shutil.copytree(interrupted_run, tmp_path / "run")
    state = torch.load(run / "last.pt", weights_only=False)
    state["args"].update(batch_size=4, replay_batch_size=2)  # TINY's, saved as one number each
    torch.save(state, run / "last.pt")
    with pytest.raises(SystemExit) as exit_info:
        run_train(demo_root, run, "--resume", "--batch_size", "4", "4", "2")
    assert "--batch_size 4 4 4" in str(exit_info.value)
    run_train(demo_root, run, "--resume")  # TINY's --batch_size 4 --replay_batch_size 2: the same recipe


def test_weight_average_is_an_exponential_moving_average_of_the_weights():
    assert train.make_weight_average(torch.nn.Linear(2, 1), 0.0) is None
    model = torch.nn.Linear(2, 1)
    average = train.make_weight_average(model, 0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    average.update_parameters(model)  # the first update copies the weights
    assert torch.equal(average.module.weight, model.weight)
    expected = 1.0
    for value in [3.0, 5.0, 7.0]:
        with torch.no_grad():
            model.weight.fill_(value)
        average.update_parameters(model)
        expected = 0.9 * expected + 0.1 * value
        assert torch.allclose(average.module.weight, torch.full_like(model.weight, expected))


def test_the_weight_average_is_what_is_validated_kept_and_passed_on(demo_root, tmp_path):
    run_train(demo_root, tmp_path, "--ema_decay", "0.9", "--blend_steps", "0")  # no blend of the kept weights
    last = torch.load(tmp_path / "last.pt", weights_only=False)  # after stage 3's only epoch
    final = torch.load(tmp_path / "model_final_best_1pass.pt", weights_only=False)["model"]
    averaged = {k.removeprefix("module."): v for k, v in last["weight_average"].items() if k != "n_averaged"}
    name = "cls_head.weight"
    assert torch.equal(final[name], averaged[name]) and not torch.equal(final[name], last["model"][name])
    assert all(torch.equal(final[k], averaged[k]) for k in final)
    log = epoch_log(tmp_path)
    report = eval_script.main(["--weights", str(tmp_path / "model_final_best_1pass.pt"), "--data_root",
                               str(demo_root), "--tasks", "cls"])
    assert log[-1]["top1"] == pytest.approx(report["metrics"]["top1"])


def test_selection_prefers_kept_epochs_then_the_smoothed_own_metric():
    baselines = {"mIoU": 0.5}
    kept, broken = {"mIoU": 0.49, "mAP_50": 0.10}, {"mIoU": 0.40, "mAP_50": 0.30}
    assert train.selection_key(kept, "det", baselines) > train.selection_key(broken, "det", baselines)
    # A lone peak loses to a steady run once the window smooths it.
    peak = train.selection_key({**kept, "mAP_50": 0.30}, "det", baselines, recent_scores=[0.10, 0.10, 0.30])
    steady = train.selection_key({**kept, "mAP_50": 0.20}, "det", baselines, recent_scores=[0.20, 0.20, 0.20])
    assert steady > peak
    assert train.selection_key(kept, "det", baselines, recent_scores=[0.10]) == (True, 0.10)


def test_scale_jitter_flags():
    defaults = options.parse_args([])
    assert (defaults.seg_scale_jitter, defaults.det_scale_jitter, defaults.cls_scale_jitter) == (None, (0.5, 1.5), None)
    assert options.parse_args(["--det_scale_jitter", "off"]).det_scale_jitter is None
    assert options.parse_args(["--cls_scale_jitter", "0.8,1.25"]).cls_scale_jitter == (0.8, 1.25)


@pytest.mark.parametrize("task", ["seg", "det", "cls"])
def test_each_train_set_gets_its_own_scale_jitter_flag(demo_root, task):
    def zoom_of(train_task, flags):
        args = options.parse_args(["--data_root", str(demo_root), "--img_size", "64", *flags])
        ops = train.build_train_set(train_task, args).augment.transforms
        return [op.scale for op in ops if isinstance(op, v2.RandomAffine)]

    assert zoom_of(task, [f"--{task}_scale_jitter", "0.7,1.4"]) == [(0.7, 1.4)]
    assert zoom_of(task, [f"--{task}_scale_jitter", "off"]) == []
    other = next(t for t in ("seg", "det", "cls") if t != task)
    assert zoom_of(other, [f"--{task}_scale_jitter", "0.7,1.4", f"--{other}_scale_jitter", "off"]) == []


def test_det_mosaic_reaches_only_the_detection_train_set(demo_root):
    args = options.parse_args(["--data_root", str(demo_root), "--img_size", "64", "--det_mosaic", "0.5"])
    assert train.build_train_set("det", args).mosaic == 0.5
    assert options.parse_args([]).det_mosaic == 0.0  # off by default
    assert not hasattr(train.build_train_set("seg", args), "mosaic")


@pytest.mark.skipif(not platform.libc_ver()[0] == "glibc", reason="keep_freed_memory tunes glibc only")
def test_keep_freed_memory_settings_are_taken_by_glibc():
    try:
        assert train.keep_freed_memory(True)
    finally:
        assert train.keep_freed_memory(False)


def test_blending_toward_the_teacher_mixes_every_float_tensor_but_the_primary_head():
    student, teacher = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False), \
        UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    weights, teacher_weights = student.state_dict(), teacher.state_dict()
    for alpha in (1.0, 0.0, 0.25):
        blended = models.blend_toward_teacher(weights, teacher_weights, alpha, "cls")
        for name, value in blended.items():
            if name.startswith("cls_head.") or not value.is_floating_point():
                assert torch.equal(value, weights[name]), name
            else:
                assert torch.allclose(value, alpha * weights[name] + (1 - alpha) * teacher_weights[name], atol=1e-6), name
    assert not torch.equal(teacher_weights["neck.0.0.weight"], weights["neck.0.0.weight"])


def test_blend_until_within_keeps_the_first_blend_that_holds_the_earlier_tasks():
    teacher, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        teacher.weight.fill_(0.0)
        model.weight.fill_(1.0)
    # the earlier task's score falls as the weight leaves the teacher's: within 5% up to 0.35
    score = lambda m: {"mIoU": 0.5 * (1 - m.weight.item() / 7)}  # noqa: E731
    alpha, metrics = train.blend_until_within(model, teacher, "cls", {"mIoU": 0.5}, 10, score, logging.getLogger())
    assert alpha == pytest.approx(0.3) and model.weight.item() == pytest.approx(0.3)
    assert metrics == score(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    assert train.blend_until_within(model, teacher, "cls", {"mIoU": 0.9}, 10, score, logging.getLogger()) is None
    assert model.weight.item() == 1.0  # back to the kept weights


def test_a_stage_that_kept_no_epoch_within_5_percent_keeps_a_blend(tiny_run, demo_root, tmp_path, monkeypatch,
                                                                   capsys):
    # Every epoch "loses" an earlier task; the first blend tried (19/20 of the new weights) holds them.
    blending = []
    original_blend = train.blend_toward_teacher

    def blend_toward_teacher(*args):
        blending.append(args[2])
        return original_blend(*args)

    monkeypatch.setattr(train, "within_max_drop", lambda metrics, baselines: bool(blending))
    monkeypatch.setattr(train, "blend_toward_teacher", blend_toward_teacher)
    s2 = tiny_run[0] / "model_s2_best.pt"
    run_train(demo_root, tmp_path, "--start_from", str(s2))
    final = torch.load(tmp_path / "model_final_best_1pass.pt", weights_only=False)
    assert blending == [0.95] and final["blend"] == 0.95
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    epoch_weights = {k.removeprefix("module."): v for k, v in last["weight_average"].items() if k != "n_averaged"}
    expected = original_blend(epoch_weights, torch.load(s2, weights_only=False)["model"], 0.95, "cls")
    assert all(torch.allclose(final["model"][k].float(), expected[k].float()) for k in expected)
    assert "blended 0.95 with stage 2's weights" in (tmp_path / "training_log_single_pass.txt").read_text()
    # the log's last line is the kept blend, with its scores: what plot_log.py and log_report.py show
    kept_line = json.loads((tmp_path / "training_log.jsonl").read_text().splitlines()[-1])
    assert kept_line["kept_blend"] == 0.95 and kept_line["epoch"] == final["epoch"]
    assert kept_line["top1"] == final["baselines"]["top1"] == final["metrics"]["top1"]
    assert kept_line["baselines"] == {k: v for k, v in final["baselines"].items() if k != "top1"}
    capsys.readouterr()
    report = eval_script.main(["--weights", str(tmp_path / "model_final_best_1pass.pt"), "--data_root",
                               str(demo_root), "--tasks", "cls"])
    assert report["metrics"]["top1"] == pytest.approx(final["baselines"]["top1"])  # the blend's own score
    assert "blended 0.95 with an earlier stage's" in capsys.readouterr().out
    # eval.py scores the same blend from the two checkpoints
    unblended = tmp_path / "unblended.pt"
    torch.save({k: v for k, v in {**final, "model": epoch_weights}.items() if k != "blend"}, unblended)
    again = eval_script.main(["--weights", str(unblended), "--blend_with", str(s2),
                              "--blend", "0.95", "--data_root", str(demo_root), "--tasks", "cls"])
    assert again["metrics"]["top1"] == pytest.approx(report["metrics"]["top1"])


def test_blending_is_off_with_blend_steps_0(tiny_run, demo_root, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "within_max_drop", lambda metrics, baselines: False)
    run_train(demo_root, tmp_path, "--start_from", str(tiny_run[0] / "model_s2_best.pt"), "--blend_steps", "0")
    assert "blend" not in torch.load(tmp_path / "model_final_best_1pass.pt", weights_only=False)


# ----------------------------------------------------------------------------- rules no test held before a mutation run (session 43)
def test_a_drop_of_exactly_5_percent_is_within():
    assert train.within_max_drop({"mIoU": 0.59375}, {"mIoU": 0.625})          # drop 5.0 exactly
    assert not train.within_max_drop({"mIoU": 0.59}, {"mIoU": 0.625})


def test_stage_3_freezes_the_detection_heads_batchnorm():
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    train.set_train_mode(model, "cls", ["seg", "det"])
    assert not model.det_head[1].training


class FixedBank:
    """A replay bank that always hands out the same images with the teacher's outputs `keys`."""
    def __init__(self, teacher, images, keys=("seg_coarse",)):
        self.images = images
        with torch.no_grad():
            self.outputs = {k: v for k, v in teacher(teacher.prepare_input(images)).items() if k in keys}

    def sample(self, batch_size):
        return self.images, self.outputs


def test_replay_batches_do_not_move_the_primary_heads_batchnorm():
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False)
    teacher = copy.deepcopy(model).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    target = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([0])}] * 2
    args = options.parse_args(["--distill_seg_new_images", "0", "--distill_det_new_images", "0", "--distill_backbone_probe", "0"])
    means = []
    for banks in ({}, {"seg": FixedBank(teacher, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))}):
        student = copy.deepcopy(model)
        train.parameter_groups(student, ["det"], ["seg"], options.LR_FACTORS[2], 1e-3)
        train.set_train_mode(student, "det", ["seg"])
        train.train_one_epoch(student, [{"det": (images, target, None)}], banks,
                              torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.0),
                              torch.amp.GradScaler("cpu", enabled=False), args, torch.device("cpu"), None)
        means.append(student.det_head[1].running_mean.clone())
    assert torch.equal(means[0], means[1])


@pytest.mark.parametrize("window, scores, kept_epoch, baseline", [
    (1, [0.1, 0.5, 0.2], 2, 0.5),      # the best single epoch
    (2, [0.1, 0.5, 0.2], 3, 0.2),      # means 0.1, 0.3, 0.35: epoch 3, whose own score is the baseline
    (1, [0.5, 0.5, 0.1], 1, 0.5),      # a tie keeps the earlier epoch
])
def test_stage_1_keeps_the_epoch_the_window_picks_with_its_own_score(demo_root, tmp_path, monkeypatch,
                                                                      window, scores, kept_epoch, baseline):
    calls = iter(scores)
    monkeypatch.setattr(train, "validate", lambda model, val_sets, tasks, args: {"mIoU": next(calls)})
    with pytest.raises(SystemExit):
        run_train(demo_root, tmp_path, "--epochs_seg", "3", "--select_window", str(window), "--stop_after_epochs", "3")
    kept = torch.load(tmp_path / "model_s1_best.pt", weights_only=False)
    assert kept["epoch"] == kept_epoch and kept["baselines"] == {"mIoU": baseline}


def test_replay_feature_mse_uses_its_own_weight():
    torch.manual_seed(0)
    model = UnifiedMultiTaskModel("efficientnet_lite0", pretrained=False).eval()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        teacher.shared_conv3[1].bias.add_(1.0)       # the teacher's shared features differ
    replay = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    bank = FixedBank(teacher, replay, keys=("det", "feat"))
    with torch.no_grad():
        expected = F.mse_loss(model(model.prepare_input(replay))["feat"], bank.outputs["feat"]).item()
    args = options.parse_args(["--distill_weight_det_logits", "3", "--distill_weight_det_feature", "1",
                             "--distill_seg_new_images", "0", "--distill_det_new_images", "0"])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    losses = train.train_one_epoch(model, [{"cls": (images, torch.tensor([1, 2]), None)}], {"det": bank},
                                   torch.optim.SGD(model.parameters(), lr=0.0), torch.amp.GradScaler("cpu", enabled=False),
                                   args, torch.device("cpu"), None)
    assert expected > 1e-4 and losses["distill_feat"] == pytest.approx(expected, rel=1e-4)


def test_each_epoch_draws_its_own_augmentation(demo_root, tmp_path, monkeypatch):
    draws, original = [], train.train_one_epoch

    def recording(*args, **kwargs):
        draws.append(torch.rand(1).item())    # the global stream the augmentations draw from
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", recording)
    with pytest.raises(SystemExit):
        run_train(demo_root, tmp_path, "--epochs_seg", "2", "--stop_after_epochs", "2")
    assert len(draws) == 2 and draws[0] != draws[1]
