"""Does pretraining transfer? A pretrained encoder against the same ViT from random weights, same finetuning budget.

    python benchmarks/transfer.py --budget cpu                 # synthetic: a few minutes on a 2-core CPU
    python benchmarks/transfer.py --budget gpu                 # synthetic: the apps' full-size ViT (3.2M), on a GPU
    python benchmarks/transfer.py --budget cpu --encoder runs/transfer/vit_pretrain/vit_encoder.pt   # reuse one
    python benchmarks/transfer.py --task real --data_dir /tmp/c10 --budget gpu    # real photos, about 5 min, one H200
    python benchmarks/transfer.py --task real --data_dir /tmp/c10 --budget cpu    # real photos, ~11 min on 2 cores

``--task synthetic`` (the default): pretrain the ViT on synthetic CIFAR-100, then finetune it on synthetic CIFAR-10 for
one epoch from the pretrained encoder and, with the same budget, from random weights. The runs are those of
`apphub_vit.run_all` (same models, data sizes and arguments per budget: see its BUDGETS), except that each CIFAR-10 run
trains for exactly one epoch. Accuracy is on the synthetic CIFAR-10 eval images after that epoch.

``--task real --data_dir D`` (D: a `cifar-10-batches-py` folder or its parent; from this project's JPEG copy of
CIFAR-10, `python ../shared/data/cifar10/to_batches.py /tmp/c10` writes one): the same question on real photos,
disjoint classes as CIFAR-100 and CIFAR-10 are. The ViT is pretrained once on ``cifar10_split_a`` (airplane,
automobile, bird, cat, deer: 25,000 training images; run_all's ``real_pretrain`` run), then finetuned on
``cifar10_split_b`` (dog, frog, horse, ship, truck) in three settings, each from that encoder and from scratch:

* ``one_epoch`` (a): one finetuning epoch on split b's training images, as the FastEstimator apphub reports its
  CIFAR-100 -> CIFAR-10 transfer (gpu and cpu: all 25,000; tiny caps the steps; the table says how many);
* ``low_data`` (b): a fixed, class-balanced subset of split b's training images drawn with --subset_seed (gpu and cpu:
  500 per class, 2,500 images), for a full finetuning run (`LOW_DATA`: gpu 30 epochs); every run of every seed sees the
  same subset, written once as a CIFAR-10 folder in OUT/low_data and read through the apps' own loader;
* ``curve`` (c): run_all's ``real_finetune`` / ``real_scratch`` runs (gpu: 10 epochs, cpu: 3, on all images), with
  the test accuracy after every epoch: OUT/learning_curve.png, both starts on one plot (mean over seeds, min-max band).

The finetuning runs use run_all's ``real_transfer`` budget (gpu: the default recipe `vit` at its batch 256 and the
full-size model; cpu: run_all's small cpu ViT and settings), changing only the epochs (a, b), and for (b) the data.
Accuracy is on split b's 5,000 test images (the tiny budget evaluates on the first few, the header says how many) at
the last epoch, from each run's `run_record.json`. Measured: docs/results-transfer.md.

Both tasks: both starts train with the same steps, batch, learning rate schedule, augmentation and data under each of
--seeds seeds (the seed fixes the new head, the data order and the augmentation draws; the scratch run's encoder too);
pretraining runs once, with seed 0. The table gives every seed's accuracy, the mean, and the spread (sample standard
deviation over seeds, and the range). Every run's folder stays in --out. Exits 1 if the pretrained start does not win
on average (the real task: in setting a), so a regression in transfer shows.
"""
import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apphub_vit.data import (CIFAR10_CLASSES, CIFAR10_SPLITS, DataNotFoundError, balanced_subset,  # noqa: E402
                             find_cifar_folder, read_cifar_folder)
from apphub_vit.records import RECORD_FILE, read_record  # noqa: E402
from apphub_vit.run_all import BUDGETS, Plan, make_plans, run_plan  # noqa: E402

STARTS = ("pretrained", "scratch")
SETTINGS = {"one_epoch": "(a)", "low_data": "(b)", "curve": "(c)"}  # the real task's settings, in the table's order
# Per budget, the low-data setting (b): labelled images per class of split b, and finetuning epochs over them.
LOW_DATA: Dict[str, Dict[str, int]] = {"tiny": dict(per_class=8, epochs=2), "cpu": dict(per_class=500, epochs=8),
                                       "gpu": dict(per_class=500, epochs=30)}
TEST_IMAGES = 5000  # split b's test images: 1,000 of each of its five classes
CURVE_FILE = "learning_curve.png"


def transfer_plans(budget: str, out: str, encoder: str, seed: int, num_process: Optional[int]) -> List[Plan]:
    """The two one-epoch CIFAR-10 runs for one seed: run_all's vit_finetune / vit_scratch plans with epochs=1."""
    plans = {p.name: p for p in make_plans(budget, out, None, False, num_process)}
    runs = []
    for name, start in (("vit_finetune", "pretrained"), ("vit_scratch", "scratch")):
        kwargs = dict(plans[name].kwargs, epochs=1, save_dir=os.path.join(out, f"{start}-seed{seed}"))
        if name == "vit_finetune":
            kwargs["encoder_weights"] = encoder
        runs.append(Plan(start, plans[name].module, kwargs, plans[name].dataset, plans[name].notes))
    return runs


def real_plans(budget: str, out: str, data_dir: str, encoder: str, seed: int, num_process: Optional[int],
               low_data_dir: str) -> Dict[str, List[Plan]]:
    """{setting: [pretrained plan, scratch plan]} for one seed: run_all's real_finetune / real_scratch plans, with one
    epoch (one_epoch), on the low-data folder for LOW_DATA's epochs (low_data), or as they are (curve)."""
    plans = {p.name: p for p in make_plans(budget, out, None, False, num_process, cifar10_dir=data_dir)}
    low = LOW_DATA[budget]
    changes = {"one_epoch": dict(epochs=1),
               "low_data": dict(epochs=low["epochs"], data_dir=low_data_dir, train_steps_per_epoch=None),
               "curve": {}}
    runs: Dict[str, List[Plan]] = {}
    for setting, change in changes.items():
        runs[setting] = []
        for name, start in (("real_finetune", "pretrained"), ("real_scratch", "scratch")):
            kwargs = dict(plans[name].kwargs, **change, save_dir=os.path.join(out, f"{setting}-{start}-seed{seed}"))
            if name == "real_finetune":
                kwargs["encoder_weights"] = encoder
            notes = plans[name].notes + ([f"low-data setting: {low['per_class']} training images per class"]
                                         if setting == "low_data" else [])
            runs[setting].append(Plan(start, plans[name].module, kwargs, plans[name].dataset, notes))
    return runs


def write_low_data_folder(data_dir: str, folder: str, per_class: int, seed: int) -> str:
    """Write `folder`/cifar-10-batches-py: `per_class` training images of each class of cifar10_split_b (a
    `balanced_subset` of them, seeded with `seed`) and split b's test images, under their CIFAR-10 labels, so that
    dataset="cifar10_split_b", data_dir=`folder` reads the low-data task through the apps' own loader. Returns
    `folder`. The same data and seed write the same subset."""
    train, test = read_cifar_folder(find_cifar_folder(data_dir, 10), 10)
    split_b = [CIFAR10_CLASSES.index(name) for name in CIFAR10_SPLITS["cifar10_split_b"]]
    in_b = np.flatnonzero(np.isin(train["y"], split_b))
    chosen = in_b[balanced_subset(train["y"][in_b], per_class, seed)]
    test_b = np.isin(test["y"], split_b)
    target = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(target, exist_ok=True)

    def write(name: str, x: np.ndarray, y: np.ndarray) -> None:  # the CIFAR site's format: rows of R, G, B planes
        with open(os.path.join(target, name), "wb") as f:
            pickle.dump({b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), b"labels": y.tolist()}, f)

    for i, part in enumerate(np.array_split(chosen, 5)):
        write(f"data_batch_{i + 1}", train["x"][part], train["y"][part])
    write("test_batch", test["x"][test_b], test["y"][test_b])
    return folder


def accuracy_of(plan: Plan) -> float:
    return float(read_record(os.path.join(plan.kwargs["save_dir"], RECORD_FILE))["final_accuracy"])


def accuracy_curve(plan: Plan) -> List[Tuple[int, float]]:
    """(epoch, eval accuracy) after every eval epoch of a finished run, from its record."""
    record = read_record(os.path.join(plan.kwargs["save_dir"], RECORD_FILE))
    key = record["metrics"]["accuracy_key"]
    return [(int(e["epoch"]), float(e["metrics"][key])) for e in record["eval"] if key in e["metrics"]]


def spread(values: Sequence[float]) -> float:
    """Sample standard deviation (0 for one value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def plot_curves(curves: Dict[str, List[List[Tuple[int, float]]]], path: str, title: str) -> None:
    """Test accuracy against finetuning epoch, per start: the mean over seeds, the min-max band, each seed faint."""
    import matplotlib
    matplotlib.use("Agg")  # a file, not a window
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for start, color in zip(STARTS, ("tab:blue", "tab:orange")):
        epochs = sorted({epoch for run in curves[start] for epoch, _ in run})
        per_epoch = [[100 * dict(run)[e] for run in curves[start] if e in dict(run)] for e in epochs]
        for run in curves[start]:
            ax.plot([e for e, _ in run], [100 * a for _, a in run], color=color, alpha=0.25, linewidth=0.8)
        ax.fill_between(epochs, [min(v) for v in per_epoch], [max(v) for v in per_epoch], color=color, alpha=0.15)
        ax.plot(epochs, [statistics.mean(v) for v in per_epoch], color=color, marker="o", linewidth=2,
                label=f"{start} (mean of {len(curves[start])} seeds)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("finetuning epoch")
    ax.set_ylabel("test accuracy (%); band: min-max over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pretrain_encoder(args: argparse.Namespace, plan: Plan, what: str, chance: float) -> Tuple[Optional[str], str]:
    """(encoder file, a line saying how it came about): `plan` run with seed 0, or --encoder as given (None if it
    is missing)."""
    if args.encoder is not None:
        if not os.path.isfile(args.encoder):
            print(f"--encoder {args.encoder}: no such file (expected a vit_encoder.pt written by apphub_vit.pretrain)")
            return None, ""
        return args.encoder, "pretraining: skipped (--encoder given)"
    seconds = run_plan(plan, seed=0)
    record = read_record(os.path.join(plan.kwargs["save_dir"], RECORD_FILE))
    epochs = record["hparams"]["epochs"]
    return (os.path.join(plan.kwargs["save_dir"], "vit_encoder.pt"),
            f"pretraining on {what}: {epochs} epoch{'s' if epochs != 1 else ''}, accuracy "
            f"{record['final_accuracy']:.4f} (chance {chance:g}), {seconds:.0f} s")


def synthetic_task(args: argparse.Namespace, out: str, num_process: Optional[int]) -> int:
    start = time.perf_counter()
    pre = make_plans(args.budget, out, None, False, num_process)[0]
    encoder, pre_line = pretrain_encoder(args, pre, "synthetic CIFAR-100", 0.01)
    if encoder is None:
        return 2

    results = {"pretrained": [], "scratch": []}
    seconds = {"pretrained": [], "scratch": []}
    for seed in range(args.seeds):
        for plan in transfer_plans(args.budget, out, encoder, seed, num_process):
            seconds[plan.name].append(run_plan(plan, seed=seed))
            results[plan.name].append(accuracy_of(plan))

    kw = plan.kwargs  # the budget is the same for every run: report the last one's
    steps = kw.get("train_steps_per_epoch") or "all"
    print(f"\nTransfer, budget '{args.budget}': {pre_line}")
    print(f"finetuning on synthetic CIFAR-10: 1 epoch ({steps} steps of batch {kw.get('batch_size') or 'default'}), "
          f"eval on {kw.get('synthetic_size', ['', 'the default'])[1]} images, seeds 0..{args.seeds - 1}\n")
    print("| start | accuracy per seed | mean accuracy | mean wall time (s) |")
    print("| --- | --- | ---: | ---: |")
    for name in STARTS:
        print(f"| {name} | {', '.join(f'{a:.4f}' for a in results[name])} | {statistics.mean(results[name]):.4f} | "
              f"{statistics.mean(seconds[name]):.1f} |")
    gain = statistics.mean(results["pretrained"]) - statistics.mean(results["scratch"])
    wins = sum(p > s for p, s in zip(results["pretrained"], results["scratch"]))
    print(f"\npretrained - scratch: {gain:+.4f} mean accuracy; pretrained wins {wins} of {args.seeds} seeds. "
          f"Total {time.perf_counter() - start:.0f} s; runs in {out}")
    return 0 if gain > 0 else 1


def _describe(setting: str, plan: Plan, budget: str) -> str:
    """What a finished run of `setting` trained on, for the table: epochs, steps and batch, from its record."""
    schedule = read_record(os.path.join(plan.kwargs["save_dir"], RECORD_FILE))["schedule"]
    epochs, batch = schedule["epochs"], schedule["batch_size"]
    steps = schedule["global_steps"] // max(epochs, 1)
    if setting == "low_data":
        per_class = LOW_DATA[budget]["per_class"]
        images = f"{per_class * 5:,} images ({per_class} per class)"
    else:
        images = "all 25,000 images" if steps * batch > 25000 - batch else f"{steps * batch:,} of the 25,000 images"
    return f"{SETTINGS[setting]} {epochs} epoch{'s' if epochs > 1 else ''} x {steps} steps of {batch}, {images}"


def real_task(args: argparse.Namespace, out: str, num_process: Optional[int]) -> int:
    start = time.perf_counter()
    try:
        find_cifar_folder(args.data_dir, 10)
    except DataNotFoundError as err:
        print(f"--data_dir: {err}")
        return 2
    pre = next(p for p in make_plans(args.budget, out, None, False, num_process, cifar10_dir=args.data_dir)
               if p.name == "real_pretrain")
    encoder, pre_line = pretrain_encoder(args, pre, f"cifar10_split_a ({', '.join(CIFAR10_SPLITS['cifar10_split_a'])})",
                                         0.2)
    if encoder is None:
        return 2
    low = LOW_DATA[args.budget]
    low_data_dir = write_low_data_folder(args.data_dir, os.path.join(out, "low_data"), low["per_class"],
                                         args.subset_seed)

    results = {s: {start: [] for start in STARTS} for s in SETTINGS}
    seconds = {s: {start: [] for start in STARTS} for s in SETTINGS}
    curves: Dict[str, List[List[Tuple[int, float]]]] = {start: [] for start in STARTS}
    for seed in range(args.seeds):
        plans = real_plans(args.budget, out, args.data_dir, encoder, seed, num_process, low_data_dir)
        for setting in SETTINGS:
            for plan in plans[setting]:
                seconds[setting][plan.name].append(run_plan(plan, seed=seed))
                results[setting][plan.name].append(accuracy_of(plan))
                if setting == "curve":
                    curves[plan.name].append(accuracy_curve(plan))

    evaluated = read_record(os.path.join(plans["curve"][0].kwargs["save_dir"], RECORD_FILE))["eval"][-1]["images"]
    print(f"\nTransfer on real photos, budget '{args.budget}': {pre_line}")
    print(f"finetuning on cifar10_split_b ({', '.join(CIFAR10_SPLITS['cifar10_split_b'])}): test accuracy at the last "
          f"epoch on {evaluated:,} of its {TEST_IMAGES:,} test images (chance 0.2), seeds 0..{args.seeds - 1}; "
          f"low-data subset seed {args.subset_seed}\n")
    print("| setting | start | accuracy per seed | mean | std | range | mean wall time (s) |")
    print("| --- | --- | --- | ---: | ---: | --- | ---: |")
    for setting in SETTINGS:
        label = _describe(setting, plans[setting][0], args.budget)
        for name in STARTS:
            acc = results[setting][name]
            wall = statistics.mean(seconds[setting][name])
            print(f"| {label} | {name} | {', '.join(f'{a:.4f}' for a in acc)} | {statistics.mean(acc):.4f} | "
                  f"{spread(acc):.4f} | {min(acc):.4f}-{max(acc):.4f} | {wall:.1f} |")
    print()
    gains = {}
    for setting in SETTINGS:
        pre_acc, scratch = results[setting]["pretrained"], results[setting]["scratch"]
        gains[setting] = statistics.mean(pre_acc) - statistics.mean(scratch)
        wins = sum(p > s for p, s in zip(pre_acc, scratch))
        print(f"{SETTINGS[setting]} {setting}: pretrained - scratch: "
              f"{gains[setting]:+.4f} mean accuracy; pretrained wins {wins} of {args.seeds} seeds")

    epochs = sorted({e for run in curves["pretrained"] for e, _ in run})
    print("\n(c) learning curve, mean test accuracy over seeds:\n")
    print("| epoch | pretrained | scratch |")
    print("| ---: | ---: | ---: |")
    for epoch in epochs:
        means = [statistics.mean(dict(run)[epoch] for run in curves[s] if epoch in dict(run)) for s in STARTS]
        print(f"| {epoch} | {means[0]:.4f} | {means[1]:.4f} |")
    curve_path = os.path.join(out, CURVE_FILE)
    plot_curves(curves, curve_path, f"ViT on CIFAR-10 split b (5 classes), budget '{args.budget}': encoder pretrained "
                f"on split a vs scratch")
    print(f"\nlearning curve: {curve_path}. Total {time.perf_counter() - start:.0f} s; runs in {out}")
    return 0 if gains["one_epoch"] > 0 else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("synthetic", "real"), default="synthetic",
                        help="synthetic CIFAR-100 -> CIFAR-10 (default), or real photos: CIFAR-10 split a -> split b "
                        "(needs --data_dir)")
    parser.add_argument("--data_dir", default=None, help="--task real: a local CIFAR-10 folder (cifar-10-batches-py "
                        "or its parent), e.g. from `python ../shared/data/cifar10/to_batches.py /tmp/c10`")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--out", default=None, help="folder for every run (default: a new temporary folder); must "
                        "not already hold these runs")
    parser.add_argument("--encoder", default=None, help="an existing vit_encoder.pt of this budget's ViT and task: "
                        "skip pretraining")
    parser.add_argument("--seeds", type=int, default=3, help="finetuning seeds per start (default 3)")
    parser.add_argument("--subset_seed", type=int, default=0, help="--task real: the seed that draws the low-data "
                        "subset (default 0)")
    parser.add_argument("--num_process", type=int, default=None, help="pipeline workers (default: run_all's)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.task == "real" and args.data_dir is None:
        parser.error("--task real needs --data_dir, a local CIFAR-10 folder (cifar-10-batches-py or its parent); from "
                     "this project's copy: python ../shared/data/cifar10/to_batches.py /tmp/c10, then --data_dir "
                     "/tmp/c10")
    if args.task == "synthetic" and args.data_dir is not None:
        parser.error("--data_dir is for --task real (the synthetic task generates its images)")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="vit-transfer-"))
    num_process = args.num_process if args.num_process is not None or args.budget == "gpu" else 0
    task = real_task if args.task == "real" else synthetic_task
    return task(args, out, num_process)


if __name__ == "__main__":
    sys.exit(main())
