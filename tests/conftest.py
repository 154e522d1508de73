"""Shared test fixtures: the repo on sys.path, the tiny demo data, the real data when present.

    demo_root        session-wide demo dataset (demo_data.make_demo, 8 train / 4 val)
    broken_copy      a fresh copy of the demo data under tmp_path, for a test to damage
    tiny_run         one tiny train.py run of all three stages (tiny.py's settings), read-only
    real_data_root   $ONEHEAD_REAL_DATA, else DL_data/ in the clone, else ../shared/DL_data;
                     skips the test when none holds the data
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import demo_data  # noqa: E402

REAL_TASK_DIRS = ("imagenette-160", "mini_coco_det", "mini_voc_seg")


def real_data_available(root: Path) -> bool:
    return all((root / d).is_dir() for d in REAL_TASK_DIRS)


# $ONEHEAD_REAL_DATA, else the clone's own DL_data/ when it holds the data, else ../shared/DL_data
REAL_DATA = Path(os.environ.get("ONEHEAD_REAL_DATA") or
                 next((root for root in (REPO / "DL_data", REPO.parent / "shared" / "DL_data")
                       if real_data_available(root)), REPO.parent / "shared" / "DL_data"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The demo data, written once per session. Tests must not modify it (use broken_copy)."""
    return demo_data.make_demo(tmp_path_factory.mktemp("demo"), n_train=8, n_val=4)


@pytest.fixture
def broken_copy(demo_root, tmp_path):
    """A private copy of the demo data that the test may damage; returns its root."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    return root


@pytest.fixture(scope="session")
def tiny_run(demo_root, tmp_path_factory):
    """One tiny run of all three stages (tiny.TINY, two detection epochs): (out_dir, baselines),
    shared by the tests that only read its outputs."""
    from tiny import run_train

    out_dir = tmp_path_factory.mktemp("run")
    return out_dir, run_train(demo_root, out_dir, "--epochs_det", "2")


@pytest.fixture(scope="session")
def real_data_root():
    if not real_data_available(REAL_DATA):
        pytest.skip(f"real data not found at {REAL_DATA} (set ONEHEAD_REAL_DATA to point at DL_data)")
    return REAL_DATA
