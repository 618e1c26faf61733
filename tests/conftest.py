"""Shared test fixtures: tiny configurations that keep every app run to seconds on a 2-core CPU."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the project's data folder beside the checkout; absent in some clones

# A ViT small enough for CPU tests: 2 layers, dim 32, patch 8 (16 tokens + CLS).
TINY_VIT = dict(num_layers=2, em_dim=32, num_heads=2, ff_dim=64, patch_size=8)
TINY_RUN = dict(epochs=1, batch_size=16, train_steps_per_epoch=4, eval_steps_per_epoch=2, num_process=0,
                synthetic_size=[256, 64])


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test with the reason when it is not there."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present (the project's shared data folder beside the checkout); "
                    f"this test needs the real data there")
    return path


def cli_env() -> dict:
    """Environment for `fastestimator train` subprocesses: quiet TF, the repo importable, no GPU."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def fastestimator_cmd() -> list:
    """The `fastestimator` command as users run it: the console script beside this Python, else its entry point."""
    script = Path(sys.executable).with_name("fastestimator")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from fastestimator.cli.main import main; main()"]
