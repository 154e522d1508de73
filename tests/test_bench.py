"""bench.py runs end to end (tiny settings on the demo data) and ends with the speedup line."""
from pathlib import Path

import pytest

import bench
import options
import train


def test_bench_prints_a_table_and_the_speedup_last(demo_root, capsys, monkeypatch):
    pipelines = []  # --pipeline's two train.py runs: their flags and their folders, not the training itself

    def fake_train_main(argv):
        pipelines.append((argv, Path(argv[argv.index("--out_dir") + 1])))
        assert pipelines[-1][1].is_dir()

    monkeypatch.setattr(train, "main", fake_train_main)
    bench.main(["--data_root", str(demo_root), "--device", "cpu", "--img_size", "64", "--batch_size", "4",
                "--replay_batch_size", "2", "--steps", "1", "--stages", "2,3", "--modes", "baseline,default",
                "--pipeline"])
    assert [argv[-1] for argv, _ in pipelines] == ["--baseline_mode", "1"]  # the default adds no flag
    for argv, out_dir in pipelines:
        assert " ".join(argv).count("--img_size 64") == 1 and "--batch_size 4 --replay_batch_size 2" in " ".join(argv)
        assert not out_dir.exists(), "the temporary run is removed"
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu")
    assert sum(line.split()[:2] in (["2", "baseline"], ["2", "default"], ["3", "baseline"], ["3", "default"])
               for line in lines) == 4
    assert any(line.startswith("pipeline 1/1/1 epochs --baseline_mode") for line in lines)
    assert lines[-1].startswith("speedup=") and float(lines[-1].split("=")[1]) > 0


def test_bench_times_train_py_input_and_batch_sizes_unless_told():
    assert bench.parse_args([]).img_sizes == options.IMG_SIZES
    assert set(bench.parse_args(["--img_size", "96"]).img_sizes.values()) == {96}
    default = bench.parse_args([])
    assert default.batch_sizes == options.BATCH_SIZES and default.replay_batch_sizes == options.REPLAY_BATCH_SIZES
    told = bench.parse_args(["--batch_size", "16", "16", "4", "--replay_batch_size", "4"])
    assert told.batch_sizes == {1: 16, 2: 16, 3: 4} and told.replay_batch_sizes == {2: 4, 3: 4}


@pytest.mark.parametrize("flags", [["--stages", "0"], ["--stages", "4"], ["--stages", "3,x"],
                                   ["--modes", "baseline,fast"], ["--steps", "0"], ["--batch_size", "0"]])
def test_bad_flags_are_rejected(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(flags)
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


def test_missing_data_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data_root", str(tmp_path / "nowhere"), "--device", "cpu", "--img_size", "64"])
    message = str(exit_info.value)
    assert message.startswith("error: ") and "nowhere" in message and "\n" not in message
