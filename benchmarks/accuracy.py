"""Train the apphub-size ViT from scratch on real CIFAR-10 and report test accuracy per epoch and the wall time.

    python ../shared/data/cifar10/to_batches.py /tmp/cifar10             # once: the real images as python pickles
    python benchmarks/accuracy.py --data_dir /tmp/cifar10 --epochs 100     # recipe "vit", the app's GPU defaults
    python benchmarks/accuracy.py --data_dir /tmp/cifar10 --epochs 15 --recipe apphub   # the seed, for reference

It runs `apphub_vit/finetune.py`'s estimator with `from_scratch=True` (6 layers, dim 256, patch 4: 3.2M parameters),
evaluates on the 10,000 test images after every epoch, and writes `accuracy.png` (test accuracy per epoch) and
`accuracy.csv` into --save_dir.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apphub_vit import finetune  # noqa: E402


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--recipe", default="vit", choices=["vit", "apphub"])
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--save_dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--train_steps_per_epoch", type=int, default=None, help="for smoke tests")
    parser.add_argument("--eval_steps_per_epoch", type=int, default=None, help="for smoke tests")
    parser.add_argument("--em_dim", type=int, default=256, help="256: the apphub size; smaller for smoke tests")
    args = parser.parse_args(argv)
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="vit-accuracy-")
    extra = {} if args.recipe == "vit" else dict(device_augment=False, precision="fp32", compile=False)
    est = finetune.get_estimator(from_scratch=True, data_dir=args.data_dir, dataset="cifair10", epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, recipe=args.recipe, save_dir=save_dir,
                                 log_steps=500, train_steps_per_epoch=args.train_steps_per_epoch,
                                 eval_steps_per_epoch=args.eval_steps_per_epoch, em_dim=args.em_dim, **extra)
    start = time.perf_counter()
    summary = est.fit(summary="accuracy", warmup=False)
    wall = time.perf_counter() - start
    acc = summary.history["eval"]["accuracy"]  # {global step: accuracy}
    steps = sorted(acc)
    per_epoch = [(i + 1, step, float(acc[step])) for i, step in enumerate(steps)]
    with open(os.path.join(save_dir, "accuracy.csv"), "w") as f:
        f.write("epoch,step,test_accuracy\n" + "".join(f"{e},{s},{a:.4f}\n" for e, s, a in per_epoch))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([e for e, _, _ in per_epoch], [a for _, _, a in per_epoch], marker=".")
    ax.set(xlabel="epoch", ylabel="CIFAR-10 test accuracy", title=f"ViT 3.2M from scratch, recipe '{args.recipe}'")
    ax.grid(alpha=0.3)
    fig.savefig(os.path.join(save_dir, "accuracy.png"), dpi=120, bbox_inches="tight")
    print("\nepoch  test accuracy")
    for epoch, _, a in per_epoch:
        print(f"{epoch:5d}  {a:.4f}")
    best = max(a for _, _, a in per_epoch)
    print(f"\nrecipe {args.recipe}: best {best:.4f}, final {per_epoch[-1][2]:.4f} after {args.epochs} epochs; "
          f"wall time {wall:.1f} s (eval included); outputs in {save_dir}")


if __name__ == "__main__":
    main()
