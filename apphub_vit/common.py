"""Pieces every app shares: where a run writes, and refusing to overwrite what a user already has there."""
import os
import time
from typing import Iterable, Optional


def resolve_save_dir(save_dir: Optional[str], app: str) -> str:
    """The run's output folder: `save_dir`, or a fresh `runs/<app>-<timestamp>` under the working directory.

    Chosen at call time (not as a default argument, which would run once at import) and printed, so the user knows
    where the weights went.
    """
    if save_dir is None:
        save_dir = os.path.join("runs", f"{app}-{time.strftime('%Y%m%d-%H%M%S')}")
        print(f"{app}: writing outputs to {os.path.abspath(save_dir)}")
    save_dir = os.path.abspath(os.path.expanduser(save_dir))
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise NotADirectoryError(f"save_dir '{save_dir}' is a file, not a folder: pass a folder for the run's outputs.")
    os.makedirs(save_dir, exist_ok=True)
    return save_dir


def ensure_outputs_free(save_dir: str, names: Iterable[str], overwrite: bool) -> None:
    """Fail before training, not after, if the run would replace files a user already has in `save_dir`."""
    taken = [name for name in names if os.path.exists(os.path.join(save_dir, name))]
    if taken and not overwrite:
        raise FileExistsError(f"save_dir '{save_dir}' already holds {', '.join(taken)} from an earlier run; not "
                              f"overwriting saved weights. Choose another save_dir, or pass overwrite=True "
                              f"(--overwrite True) to replace them.")
