"""bench.py runs end to end (tiny settings on the demo data) and ends with the speedup line."""
import bench
import train


def test_bench_prints_a_table_and_the_speedup_last(demo_root, capsys):
    bench.main(["--data_root", str(demo_root), "--device", "cpu", "--img_size", "64", "--batch_size", "4",
                "--replay_batch_size", "2", "--steps", "1", "--stages", "2,3", "--modes", "baseline,default",
                "--pipeline"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("device cpu")
    assert sum(line.split()[:2] in (["2", "baseline"], ["2", "default"], ["3", "baseline"], ["3", "default"])
               for line in lines) == 4
    assert any(line.startswith("pipeline 1/1/1 epochs --baseline_mode") for line in lines)
    assert lines[-1].startswith("speedup=") and float(lines[-1].split("=")[1]) > 0


def test_bench_times_train_py_input_sizes_unless_told():
    assert bench.parse_args([]).img_sizes == train.IMG_SIZES
    assert set(bench.parse_args(["--img_size", "96"]).img_sizes.values()) == {96}
