"""Real-data check of the MNIST ViT app: train on the first 8,000 of MNIST's 10,000 test images, evaluate on the last
2,000, print the accuracy and the wall time.

    python3 benchmarks/mnist_accuracy.py                      # default recipe; data at <repo>/../shared/data/mnist
    python3 benchmarks/mnist_accuracy.py --recipe reference   # the tutorials' recipe (misses the target: ~93%)
    python3 benchmarks/mnist_accuracy.py --epochs 20 --batch_size 128 --data_dir PATH

Target: >= 97% accuracy in under 10 minutes on a 2-core CPU. The default is the app's default recipe, "small_data"
(see `apphub_vit.mnist`); --epochs overrides the recipe's epochs. The accuracy is recomputed here from the final model
over all 2,000 eval images, independently of FastEstimator's Accuracy trace (which now agrees with it: the compat fix
of the InfiniteSampler made evaluation see every eval image). The load average is printed because the machine may be
shared: other processes slow the run. Exits 1 if the target is missed.
"""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULTS = {"recipe": "small_data", "batch_size": 128}
TARGET_ACCURACY, TARGET_SECONDS = 0.97, 600.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=os.path.join(REPO, "..", "shared", "data", "mnist"))
    parser.add_argument("--recipe", default=DEFAULTS["recipe"], choices=("small_data", "reference"),
                        help="the app's recipe (apphub_vit.mnist.RECIPES)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    parser.add_argument("--batch_size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice; 1 is steadier on a busy machine)")
    parser.add_argument("--num_process", type=int, default=0,
                        help="pipeline workers (0: in the main process, which leaves both cores to torch)")
    args = parser.parse_args()
    if not os.path.isdir(args.data_dir):
        print(f"No MNIST data at {os.path.abspath(args.data_dir)}: pass --data_dir PATH (a folder with the MNIST IDX "
              f"files).")
        return 2
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    import numpy as np
    import torch

    from apphub_vit.mnist import get_estimator
    from apphub_vit.mnist_data import MNIST_MEAN, MNIST_STD, read_mnist_folder
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as save_dir:
        estimator = get_estimator(recipe=args.recipe, epochs=args.epochs, batch_size=args.batch_size,
                                  data_dir=args.data_dir, save_dir=save_dir, num_process=args.num_process, log_steps=0)
        estimator.fit(warmup=False)
        train_seconds = time.perf_counter() - start
        _, eval_set = read_mnist_folder(args.data_dir)
        model = estimator.model.eval()
        with torch.no_grad():
            x = torch.from_numpy((eval_set["x"].astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD)[:, None]
            pred = torch.cat([model(chunk).argmax(-1) for chunk in x.split(500)]).numpy()
    accuracy = float((pred == eval_set["y"]).mean())
    seconds = time.perf_counter() - start
    epochs = estimator.config["recipe"]["epochs"]
    print(f"MNIST ViT: recipe {args.recipe}, epochs {epochs}, batch {args.batch_size}, train "
          f"{estimator.config['num_train']} / eval {len(pred)} images, torch threads {torch.get_num_threads()}, "
          f"CPU cores {os.cpu_count()}, load average at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"(other processes share the CPU when above 0)")
    print(f"accuracy on the last 2,000 images: {accuracy:.4f} ({int((pred == eval_set['y']).sum())}/{len(pred)})")
    print(f"wall time: {seconds:.1f} s (including imports and data loading; training done at {train_seconds:.1f} s)")
    ok = accuracy >= TARGET_ACCURACY and seconds < TARGET_SECONDS
    print(f"target (>= {TARGET_ACCURACY:.0%} in < {TARGET_SECONDS / 60:.0f} min): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
