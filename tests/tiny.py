"""The tiny train.py settings the tests share: an untrained Lite0 at 64 px, one epoch a stage."""
import train

TINY = ["--backbone", "efficientnet_lite0", "--no-pretrained", "--img_size", "64", "--batch_size", "4",
        "--replay_batch_size", "2", "--epochs_seg", "1", "--epochs_det", "1", "--epochs_cls", "1"]


def run_train(demo_root, out_dir, *extra):
    return train.main(["--data_root", str(demo_root), "--out_dir", str(out_dir), *TINY, *extra])
