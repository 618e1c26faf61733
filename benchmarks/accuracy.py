"""Train the apphub-size ViT from scratch on real CIFAR-10 and report test accuracy per epoch and the wall time.

    python ../shared/data/cifar10/to_batches.py /tmp/cifar10             # once: the real images as python pickles
    python benchmarks/accuracy.py --data_dir /tmp/cifar10                  # recipe "vit", 100 epochs, the defaults
    python benchmarks/accuracy.py --data_dir /tmp/cifar10 --recipe apphub  # the seed, for reference
    python benchmarks/accuracy.py --data_dir /tmp/cifar10 --weight_decay 0.1 --lsa False   # any app option

It runs `apphub_vit/finetune.py`'s estimator with `from_scratch=True`, evaluates on the 10,000 test images after every
epoch, and writes `accuracy.png` (test accuracy per epoch) and `accuracy.csv` into --save_dir. Every option other than
--data_dir, --save_dir and --restore_dir goes to the app as it is, parsed as FastEstimator's command line parses it
(`--lr 1e-3`, `--lsa False`), so the app checks it; --epochs defaults to the recipe's. The measurements made with it
are in docs/results-cifar10.md.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch
from fastestimator.trace import Trace
from fastestimator.util.data import Data

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastestimator.util.cli_util import parse_cli_to_dictionary  # noqa: E402

from apphub_vit import finetune  # noqa: E402


class Resume(Trace):
    """Save model, optimizer, epoch, step and the accuracies so far after every eval; on start, resume from them.

    FastEstimator's own RestoreWizard cannot save this run on Python 3.11 (it pickles every op's `__getstate__`,
    which Python 3.11 gives every object, compiled functions included)."""
    def __init__(self, directory: str, model: torch.nn.Module) -> None:
        super().__init__(inputs="accuracy", mode="eval")  # after the Accuracy trace
        self.path, self.model = os.path.join(directory, "resume.pt"), model
        self.history: Dict[int, float] = {}
        self.earlier_seconds, self.start = 0.0, time.perf_counter()

    def on_begin(self, data: Data) -> None:
        if os.path.isfile(self.path):
            state = torch.load(self.path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(state["model"])
            self.model.optimizer.load_state_dict(state["optimizer"])
            self.system.epoch_idx, self.system.global_step = state["epoch"], state["step"]
            self.history, self.earlier_seconds = state["history"], state["seconds"]
            print(f"accuracy.py: resumed after epoch {state['epoch']} (step {state['step']}) from {self.path}")

    def on_epoch_end(self, data: Data) -> None:  # eval epochs only (mode="eval")
        self.history[self.system.global_step] = float(data["accuracy"])
        state = {"model": self.model.state_dict(), "optimizer": self.model.optimizer.state_dict(),
                 "epoch": self.system.epoch_idx, "step": self.system.global_step, "history": self.history,
                 "seconds": self.earlier_seconds + time.perf_counter() - self.start}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        torch.save(state, self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)  # a kill mid-save leaves the previous checkpoint whole


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--save_dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--restore_dir", default=None, help="save the training state here after every epoch "
                        "(the Resume trace below) and resume from it when it holds one: for machines that give a run "
                        "less time than it needs. The wall time printed then sums every segment's.")
    args, app_args = parser.parse_known_args(argv)
    options = {"epochs": None, "log_steps": 500, **parse_cli_to_dictionary(app_args)}  # epochs: the recipe's
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="vit-accuracy-")
    est = finetune.get_estimator(from_scratch=True, data_dir=args.data_dir, dataset="cifair10", save_dir=save_dir,
                                 **options)
    resume = Resume(args.restore_dir, est.model) if args.restore_dir else None
    if resume:
        est.traces.append(resume)
    start = time.perf_counter()
    summary = est.fit(summary="accuracy", warmup=False)
    wall = time.perf_counter() - start
    acc = summary.history["eval"]["accuracy"]  # {global step: accuracy}
    if resume:
        acc = {**resume.history, **acc}
        wall += resume.earlier_seconds
    steps = sorted(acc)
    per_epoch = [(i + 1, step, float(acc[step])) for i, step in enumerate(steps)]
    with open(os.path.join(save_dir, "accuracy.csv"), "w") as f:
        f.write("epoch,step,test_accuracy\n" + "".join(f"{e},{s},{a:.4f}\n" for e, s, a in per_epoch))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e for e, _, _ in per_epoch], [a for _, _, a in per_epoch], marker=".")
    recipe = est.config["recipe"]["name"]
    ax.set(xlabel="epoch", ylabel="CIFAR-10 test accuracy", title=f"ViT from scratch, recipe '{recipe}'")
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(save_dir, "accuracy.png"), dpi=120, bbox_inches="tight")
    print("\nepoch  test accuracy")
    for epoch, _, a in per_epoch:
        print(f"{epoch:5d}  {a:.4f}")
    best = max(a for _, _, a in per_epoch)
    print(f"\nrecipe {recipe}: best {best:.4f}, final {per_epoch[-1][2]:.4f} after {len(per_epoch)} epochs; "
          f"wall time {wall:.1f} s (eval included); outputs in {save_dir}")


if __name__ == "__main__":
    main()
