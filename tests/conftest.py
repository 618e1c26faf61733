"""Shared test fixtures: tiny configurations that keep every app run to seconds on a 2-core CPU."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"  # the project's data folder beside the checkout; absent in some clones

# A ViT small enough for CPU tests: 2 layers, dim 32, patch 8 (16 tokens + CLS)
TINY_SHAPE = dict(num_layers=2, em_dim=32, num_heads=2, ff_dim=64, patch_size=8)
# ... as the CIFAR ViT apps' options, without the distillation teacher: recipe "vit" first trains a ResNet-9 for 24
# epochs, minutes on a CPU (tests/test_teacher.py runs it with fewer)
TINY_VIT = dict(TINY_SHAPE, distill=0)
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


@pytest.fixture(autouse=True)
def no_full_teacher_in_tests(monkeypatch):
    """A test that builds recipe "vit" as it is would train its ResNet-9 teacher for 12 epochs, minutes on a CPU:
    fail it at once, saying how to keep it to seconds."""
    from apphub_vit import vit_app
    train_teacher = vit_app.train_teacher

    def guarded(*args, **kwargs):
        epochs = kwargs.get("epochs", args[3] if len(args) > 3 else None)
        if epochs is not None and epochs > 2:
            pytest.fail(f"this test trains the distillation teacher for {epochs} epochs: pass distill=0 "
                        f"(conftest.TINY_VIT) or teacher_epochs=1")
        return train_teacher(*args, **kwargs)

    monkeypatch.setattr(vit_app, "train_teacher", guarded)
