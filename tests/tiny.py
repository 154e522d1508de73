"""The tiny train.py settings the tests share: an untrained Lite0 at 64 px, one epoch a stage."""
import json

import train

TINY = ["--backbone", "efficientnet_lite0", "--no-pretrained", "--img_size", "64", "--batch_size", "4",
        "--replay_batch_size", "2", "--epochs_seg", "1", "--epochs_det", "1", "--epochs_cls", "1"]


def run_train(demo_root, out_dir, *extra):
    return train.main(["--data_root", str(demo_root), "--out_dir", str(out_dir), *TINY, *extra])


def epoch_log(out_dir):
    """The epoch records of a run's training_log.jsonl, in order: a stage's kept-blend line left out
    (the tiny run's stage 2, which scores about 0, keeps a blend)."""
    lines = (out_dir / "training_log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "kept_blend" not in record]
