"""Run the whole comparison with one command, on data that needs no download, then compare the runs.

    python -m apphub_vit.run_all --out runs/compare-cpu --budget cpu --mnist_dir ../shared/data/mnist   # ~10 min
    python -m apphub_vit.run_all --out runs/compare-gpu --budget gpu --mnist_dir ../shared/data/mnist   # a GPU
    python -m apphub_vit.run_all --out runs/compare-gpu --budget gpu --mnist_dir ../shared/data/mnist \
        --cifar10_dir /tmp/c10                        # and the real-photo transfer runs (a cifar-10-batches-py here)

The runs, each into OUT/<run> with its `run_record.json`, in this order:

* ``vit_pretrain``: our ViT pretrained on synthetic CIFAR-100 (`apphub_vit.pretrain`), saving its encoder;
* ``vit_finetune``: that encoder finetuned on synthetic CIFAR-10 (`apphub_vit.finetune`);
* ``vit_scratch``: the same ViT on the same CIFAR-10 task from random weights, with the same finetuning budget
  (steps, batch, learning rate): the transfer question is vit_finetune against vit_scratch;
* ``mnist_vit``: the MNIST ViT (`apphub_vit.mnist`) on the real digits of --mnist_dir (its first 8,000 test images
  train, the last 2,000 evaluate); without --mnist_dir on synthetic rendered digits;
* ``mnist_autoencoder``: the MNIST autoencoder (`apphub_vit.autoencoder`), same data (no accuracy: loss only);
* ``resnet18``: the ResNet-18 baseline (`apphub_vit.resnet`) on synthetic CIFAR-10;
* ``vit_b16``: the ViT-B/16 baseline (`apphub_vit.vit_b16`) on synthetic CIFAR-100;
* with --cifar10_dir (a local CIFAR-10 folder) only, the transfer question on real photos, after ``vit_scratch``:
  ``real_pretrain`` (the ViT pretrained on five CIFAR-10 classes, ``cifar10_split_a``), ``real_finetune`` (its
  encoder finetuned on the five others, ``cifar10_split_b``) and ``real_scratch`` (the same ViT and budget on split b
  from random weights). `benchmarks/transfer.py --task real` asks that question alone, over seeds.

The two torchvision baselines use the ImageNet weights when they are in the torch hub cache; otherwise they train from
random weights (ResNet-18 with every layer trainable; ViT-B/16 still with only its last blocks and head trainable) and
the record's notes say so. Under the cpu budget they also run at CIFAR's 32x32 (ViT-B/16 at a tiny width and depth),
since 224x224 images cost minutes per step on two cores; the record's hparams hold the exact sizes.

Budgets: ``cpu`` fits about 10 minutes on a 2-core CPU (small models, a few hundred steps each; --cifar10_dir adds
about 4); ``gpu`` trains the apps' default models at full size on more data for longer. ``tiny`` (seconds, for tests)
checks the plumbing only.
Apps are called in-process through their ``get_estimator(...)`` and ``fit()``; a RunRecorder is attached to any app
that does not add its own. A run that fails is reported and the others go on; the comparison covers those that
finished, and the exit status is then 1. Existing run folders or comparison files are never replaced unless --force.
Finally `apphub_vit.compare` writes OUT/comparison.md and OUT/comparison.png and prints the table.
"""
import argparse
import importlib
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import fastestimator as fe

from apphub_vit.compare import OUTPUT_FILES, compare
from apphub_vit.data import CIFAR10_SPLITS, DataNotFoundError, find_cifar_folder
from apphub_vit.records import attach_recorder

RUNS = ("vit_pretrain", "vit_finetune", "vit_scratch", "mnist_vit", "mnist_autoencoder", "resnet18", "vit_b16")
REAL_RUNS = ("real_pretrain", "real_finetune", "real_scratch")  # only with a CIFAR-10 folder (--cifar10_dir)
SCRATCH_APP = {"vit_scratch": "vit_finetune", "real_scratch": "real_finetune"}  # the app a from-scratch run records

# Per budget and run: the get_estimator arguments. The ViT finetune and scratch runs share one entry ("vit_transfer")
# so their budgets cannot drift apart; "vit" is the architecture all three ViT runs use. "real_pretrain" and
# "real_transfer" are the same for the real-photo runs (CIFAR-10 split a -> split b, 25,000 training and 5,000 test
# images each), with the same "vit" architecture; `benchmarks/transfer.py --task real` finetunes with "real_transfer".
BUDGETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "tiny": {
        "vit": dict(num_layers=1, em_dim=16, num_heads=2, ff_dim=32, patch_size=8),
        "vit_pretrain": dict(epochs=1, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1,
                             synthetic_size=[64, 32]),
        "vit_transfer": dict(epochs=1, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1,
                             synthetic_size=[64, 32]),
        "real_pretrain": dict(epochs=1, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1),
        "real_transfer": dict(epochs=2, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1),
        "mnist_vit": dict(epochs=1, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1, num_layers=1,
                          em_dim=16, num_heads=2, ff_dim=32, synthetic_size=[64, 32]),
        "mnist_autoencoder": dict(epochs=1, batch_size=16, train_steps_per_epoch=2, eval_steps_per_epoch=1,
                                  synthetic_size=[64, 32]),
        "resnet18": dict(epochs=1, batch_size=8, train_steps_per_epoch=1, eval_steps_per_epoch=1, image_size=32,
                         synthetic_size=[32, 16]),
        "vit_b16": dict(epochs=1, batch_size=8, train_steps_per_epoch=1, eval_steps_per_epoch=1, image_size=32,
                        patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, trainable_blocks=1,
                        synthetic_size=[32, 16]),
    },
    "cpu": {  # about 10 minutes on an idle 2-core CPU (2.4 GHz EPYC); much longer when other jobs share the cores
        "vit": dict(num_layers=2, em_dim=64, num_heads=4, ff_dim=128, patch_size=4),
        # A higher learning rate than the recipe's 2e-3 * 64 / 512 and no MixUp / CutMix: both pay in runs this short
        # (measured: 25% vs 10% pretraining accuracy after 1,200 steps).
        "vit_pretrain": dict(epochs=12, batch_size=64, train_steps_per_epoch=300, eval_steps_per_epoch=16,
                             synthetic_size=[19200, 1024], lr=2e-3, augment="apphub"),
        "vit_transfer": dict(epochs=6, batch_size=64, train_steps_per_epoch=100, eval_steps_per_epoch=16,
                             synthetic_size=[6400, 1024], lr=2e-3, augment="apphub"),
        # real photos, the same settings: whole epochs (390 steps of 25,000 images), eval on all 5,000 test images
        "real_pretrain": dict(epochs=8, batch_size=64, lr=2e-3, augment="apphub"),
        "real_transfer": dict(epochs=3, batch_size=64, lr=2e-3, augment="apphub"),
        # the app's default "small_data" recipe cut to 10 of its 30 epochs; 8,000 train / 2,000 eval digits
        "mnist_vit": dict(epochs=10, batch_size=128),
        "mnist_autoencoder": dict(epochs=10, batch_size=128),
        "resnet18": dict(epochs=4, batch_size=32, train_steps_per_epoch=40, eval_steps_per_epoch=16, image_size=32,
                         synthetic_size=[2560, 512]),
        "vit_b16": dict(epochs=4, batch_size=64, train_steps_per_epoch=40, eval_steps_per_epoch=16, image_size=32,
                        patch_size=4, num_layers=6, num_heads=4, hidden_dim=96, mlp_dim=192, trainable_blocks=3,
                        synthetic_size=[2560, 1024]),
    },
    "gpu": {
        "vit": dict(),  # the apps' defaults: the apphub's 6 layers, dim 256, patch 4 (3.2M parameters)
        "vit_pretrain": dict(epochs=20, batch_size=128),  # synthetic CIFAR-100 at CIFAR's size, 50,000 / 10,000
        "vit_transfer": dict(epochs=5, batch_size=128),
        # the default recipe as it is (batch 256, warmup capped at a fifth of the run), all images, eval every epoch
        "real_pretrain": dict(epochs=60),
        "real_transfer": dict(epochs=10),
        "mnist_vit": dict(batch_size=128),  # the app's default "small_data" recipe in full (30 epochs)
        "mnist_autoencoder": dict(epochs=10, batch_size=128),
        "resnet18": dict(epochs=5, batch_size=32, image_size=224, synthetic_size=[10000, 2000]),  # the recipe's 224
        "vit_b16": dict(epochs=3, batch_size=64, image_size=224, synthetic_size=[10000, 2000]),  # full-size B/16
    },
}


# Every ViT run of a comparison trains without recipe "vit"'s distillation teacher: a pretrained encoder finetunes
# without one, so the from-scratch run of the same budget must too; and the teacher's 12 epochs would outlast the small
# budgets' whole runs on a CPU. It also predicts on each image alone, without recipe "vit"'s test-time augmentation,
# as the baselines beside it do.
LIKE_FOR_LIKE = dict(distill=0, tta="none")


def _imagenet_weights(arch: str) -> Optional[str]:
    """"imagenet" when torchvision's ImageNet file for `arch` is in the torch hub cache, else None (random init)."""
    try:
        from networks.baselines import imagenet_weights_path
    except ImportError:
        return None
    return "imagenet" if os.path.isfile(imagenet_weights_path(arch)) else None


class Plan:
    """What one run needs: the app module, its get_estimator arguments, and what the record should say."""
    def __init__(self, name: str, module: str, kwargs: Dict[str, Any], dataset: str,
                 notes: Sequence[str] = ()) -> None:
        self.name, self.module, self.kwargs, self.dataset, self.notes = name, module, kwargs, dataset, list(notes)


def make_plans(budget: str, out: str, mnist_dir: Optional[str], force: bool, num_process: Optional[int],
               cifar10_dir: Optional[str] = None) -> List[Plan]:
    """The seven runs of the comparison under `budget`, writing into OUT/<run>; with `cifar10_dir` (a local CIFAR-10
    folder) the three real-photo transfer runs (`REAL_RUNS`) too, after vit_scratch."""
    preset = BUDGETS[budget]
    common = lambda name: dict(save_dir=os.path.join(out, name), overwrite=force, num_process=num_process)  # noqa
    vit = preset["vit"]
    pretrain_dir = os.path.join(out, "vit_pretrain")
    mnist_data = dict(dataset="mnist", data_dir=mnist_dir) if mnist_dir else dict(dataset="synthetic")
    mnist_note = [] if mnist_dir else ["synthetic rendered digits (no --mnist_dir given), not real MNIST"]
    if not mnist_dir and budget == "cpu":
        preset = dict(preset, mnist_vit=dict(preset["mnist_vit"], synthetic_size=[8000, 2000]),
                      mnist_autoencoder=dict(preset["mnist_autoencoder"], synthetic_size=[8000, 2000]))
    mnist_kwargs = {k: v for k, v in preset["mnist_vit"].items() if mnist_dir is None or k != "synthetic_size"}
    ae_kwargs = {k: v for k, v in preset["mnist_autoencoder"].items() if mnist_dir is None or k != "synthetic_size"}
    plans = [
        Plan("vit_pretrain", "apphub_vit.pretrain",
             dict(preset["vit_pretrain"], dataset="synthetic", **vit, **LIKE_FOR_LIKE, **common("vit_pretrain")),
             "synthetic CIFAR-100"),
        Plan("vit_finetune", "apphub_vit.finetune",
             dict(preset["vit_transfer"], dataset="synthetic", encoder_weights=os.path.join(pretrain_dir,
                                                                                            "vit_encoder.pt"),
                  **_arch(vit), **LIKE_FOR_LIKE, **common("vit_finetune")), "synthetic CIFAR-10",
             ["encoder pretrained by the vit_pretrain run of this comparison"]),
        Plan("vit_scratch", "apphub_vit.finetune",
             dict(preset["vit_transfer"], dataset="synthetic", from_scratch=True, **_arch(vit), **LIKE_FOR_LIKE,
                  **common("vit_scratch")), "synthetic CIFAR-10",
             ["the vit_finetune ViT and budget, from random weights (no pretraining)"]),
        *(real_plans(preset, vit, cifar10_dir, common) if cifar10_dir else []),
        Plan("mnist_vit", "apphub_vit.mnist", dict(mnist_kwargs, **mnist_data, **common("mnist_vit")),
             "MNIST" if mnist_dir else "synthetic digits", mnist_note),
        Plan("mnist_autoencoder", "apphub_vit.autoencoder",
             dict(ae_kwargs, **mnist_data, **common("mnist_autoencoder")),
             "MNIST" if mnist_dir else "synthetic digits", mnist_note),
    ]
    for name, arch, module, dataset in (("resnet18", "resnet18", "apphub_vit.resnet", "synthetic CIFAR-10"),
                                        ("vit_b16", "vit_b_16", "apphub_vit.vit_b16", "synthetic CIFAR-100")):
        # The reduced ViT-B/16 of the small budgets has other shapes than the ImageNet file: random weights there.
        weights = _imagenet_weights(arch) if name == "resnet18" or budget == "gpu" else None
        kwargs = dict(preset[name], dataset="synthetic", weights=weights, **common(name))
        why = ("not in the torch hub cache" if budget == "gpu" or name == "resnet18"
               else "they do not fit the reduced model")
        notes = [] if weights else [f"no ImageNet weights ({why}): trained from random weights"]
        if budget != "gpu":
            notes.append(f"reduced for the {budget} budget: images at {kwargs['image_size']}x{kwargs['image_size']}"
                         + (" and a tiny VisionTransformer (see hparams), not ViT-B/16's size" if name == "vit_b16"
                            else ""))
        plans.append(Plan(name, module, kwargs, dataset, notes))
    return plans


def real_plans(preset: Dict[str, Dict[str, Any]], vit: Dict[str, Any], cifar10_dir: str,
               common: Callable[[str], Dict[str, Any]]) -> List[Plan]:
    """The real-photo transfer runs of a budget's `preset`: pretrain on CIFAR-10 split a, finetune its encoder on split
    b, and the same ViT and finetuning budget on split b from random weights."""
    a, b = (", ".join(CIFAR10_SPLITS[f"cifar10_split_{k}"]) for k in "ab")
    return [
        Plan("real_pretrain", "apphub_vit.pretrain",
             dict(preset["real_pretrain"], dataset="cifar10_split_a", data_dir=cifar10_dir, **vit, **LIKE_FOR_LIKE,
                  **common("real_pretrain")), "CIFAR-10 split a", [f"real photos: the CIFAR-10 classes {a}"]),
        Plan("real_finetune", "apphub_vit.finetune",
             dict(preset["real_transfer"], dataset="cifar10_split_b", data_dir=cifar10_dir,
                  encoder_weights=os.path.join(common("real_pretrain")["save_dir"], "vit_encoder.pt"), **_arch(vit),
                  **LIKE_FOR_LIKE, **common("real_finetune")), "CIFAR-10 split b",
             [f"real photos: the CIFAR-10 classes {b}",
              "encoder pretrained by the real_pretrain run of this comparison, on the five other classes"]),
        Plan("real_scratch", "apphub_vit.finetune",
             dict(preset["real_transfer"], dataset="cifar10_split_b", data_dir=cifar10_dir, from_scratch=True,
                  **_arch(vit), **LIKE_FOR_LIKE, **common("real_scratch")), "CIFAR-10 split b",
             [f"real photos: the CIFAR-10 classes {b}",
              "the real_finetune ViT and budget, from random weights (no pretraining)"]),
    ]


def _arch(vit: Dict[str, Any]) -> Dict[str, Any]:
    """The ViT architecture, stated in full for both CIFAR-10 runs: finetune checks it against the pretrained encoder,
    and the from-scratch run would otherwise take the apphub's defaults, not the pretrained ViT's."""
    from dataclasses import asdict

    from networks.vit import ViTConfig
    defaults = asdict(ViTConfig())
    return {k: vit.get(k, defaults[k]) for k in ("num_layers", "em_dim", "num_heads", "ff_dim", "patch_size")}


def check_outputs_free(out: str, plans: Sequence[Plan], force: bool) -> None:
    """Refuse to start (before minutes of training) if OUT already holds runs or a comparison, unless --force."""
    if force:
        return
    taken = [os.path.join(out, p.name) for p in plans
             if os.path.isdir(os.path.join(out, p.name)) and os.listdir(os.path.join(out, p.name))]
    taken += [os.path.join(out, f) for f in OUTPUT_FILES if os.path.exists(os.path.join(out, f))]
    if taken:
        raise FileExistsError(f"{', '.join(taken)} already exist(s) from an earlier comparison; not overwriting. "
                              f"Choose another --out, or pass --force to replace them.")


def run_plan(plan: Plan, seed: int, log: Callable[[str], None] = print) -> float:
    """Build the app's estimator, attach a RunRecorder if it has none, fit; returns the wall seconds."""
    start = time.perf_counter()
    fe.enable_deterministic(seed)  # every run starts from the same seed, whatever ran before it in this process
    app = importlib.import_module(plan.module)
    estimator = app.get_estimator(**plan.kwargs)
    hparams = {k: v for k, v in plan.kwargs.items() if k not in ("save_dir", "overwrite")}
    attach_recorder(estimator, app=SCRATCH_APP.get(plan.name, plan.name),
                    save_dir=plan.kwargs["save_dir"], dataset=plan.dataset, hparams=hparams,
                    overwrite=plan.kwargs["overwrite"], notes=plan.notes)
    estimator.fit(warmup=False)
    elapsed = time.perf_counter() - start
    log(f"run_all: {plan.name} finished in {elapsed:.1f} s")
    return elapsed


def run_all(out: str, budget: str = "cpu", mnist_dir: Optional[str] = None, force: bool = False,
            only: Optional[Sequence[str]] = None, num_process: Optional[int] = None, seed: int = 0,
            cifar10_dir: Optional[str] = None) -> int:
    """Run the comparison (see the module doc); returns the exit status: 0, or 1 if a run failed."""
    start = time.perf_counter()
    out_arg, out = out, os.path.abspath(os.path.expanduser(out))
    if num_process is None and budget != "gpu":
        num_process = 0  # on a 2-core CPU, pipeline worker processes compete with training for the same cores
    if mnist_dir is not None and not os.path.isdir(mnist_dir):
        raise FileNotFoundError(f"--mnist_dir '{mnist_dir}' is not a folder (expected the MNIST IDX files, e.g. "
                                f"../shared/data/mnist).")
    if cifar10_dir is not None:
        try:  # before any training: a wrong folder fails now, saying what it holds
            find_cifar_folder(cifar10_dir, 10)
        except DataNotFoundError as err:
            raise DataNotFoundError(f"--cifar10_dir: {err}") from None
    plans = make_plans(budget, out, mnist_dir, force, num_process, cifar10_dir)
    if only:
        names = RUNS + (REAL_RUNS if cifar10_dir else ())
        unknown = sorted(set(only) - set(names))
        if unknown:
            hint = "" if cifar10_dir else f" ({', '.join(REAL_RUNS)} need --cifar10_dir)"
            raise ValueError(f"--only: unknown run(s) {unknown}; choose from {', '.join(names)}{hint}")
        by_name = {p.name: p for p in plans}
        for tuned, pre in (("vit_finetune", "vit_pretrain"), ("real_finetune", "real_pretrain")):
            if tuned in only and pre not in only and not os.path.isfile(by_name[tuned].kwargs["encoder_weights"]):
                raise ValueError(f"--only {tuned} needs the encoder of {pre}: add {pre}, or run it first into the "
                                 f"same --out.")
        plans = [p for p in plans if p.name in only]
    check_outputs_free(out, plans, force)
    os.makedirs(out, exist_ok=True)
    times: Dict[str, float] = {}
    failed: List[str] = []
    for plan in plans:
        print(f"\nrun_all: === {plan.name} ({plan.module}, {plan.dataset}) -> {plan.kwargs['save_dir']}", flush=True)
        try:
            times[plan.name] = run_plan(plan, seed)
        except Exception:  # one broken app must not cost the other runs: report it, compare the rest
            traceback.print_exc()
            print(f"run_all: {plan.name} FAILED (see the traceback above); going on with the other runs", flush=True)
            failed.append(plan.name)
    done = [os.path.join(out, p.name) for p in plans if p.name in times]
    if not done:
        print("run_all: no run finished; nothing to compare.", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    command = " ".join(["python -m apphub_vit.run_all", "--out", out_arg, "--budget", budget]
                       + (["--mnist_dir", mnist_dir] if mnist_dir else [])
                       + (["--cifar10_dir", cifar10_dir] if cifar10_dir else []))
    footer = (f"Produced by `{command}` in {wall / 60:.1f} min wall time (all runs with their data generation and "
              f"evaluation; Python's start and imports, about 15 s on 2 cores, not included; per run: "
              + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ")."
              + (f" Failed: {', '.join(failed)}." if failed else ""))
    table, _ = compare(done, out, force=force, footer=footer, warn=lambda msg: print(msg, file=sys.stderr))
    print("\n" + table)
    print(f"\nrun_all: {len(done)} runs in {wall:.0f} s ({wall / 60:.1f} min); wrote {out}/comparison.md and "
          f"{out}/comparison.png" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apphub_vit.run_all", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the runs (OUT/<run>) and the comparison")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                        help="cpu: ~10 min on 2 cores; gpu: full-size models, longer; tiny: seconds, a smoke test")
    parser.add_argument("--mnist_dir", help="folder with real MNIST IDX files (e.g. ../shared/data/mnist); without "
                        "it the MNIST apps use synthetic digits")
    parser.add_argument("--cifar10_dir", help="a local CIFAR-10 folder (cifar-10-batches-py or its parent, e.g. from "
                        "`python ../shared/data/cifar10/to_batches.py /tmp/c10`): add the real-photo transfer runs "
                        f"{', '.join(REAL_RUNS)}")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(RUNS + REAL_RUNS)}")
    parser.add_argument("--num_process", type=int, help="pipeline workers (default: 0 on cpu/tiny, FE's on gpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace runs and comparison files already in OUT")
    args = parser.parse_args(argv)
    try:
        return run_all(args.out, args.budget, args.mnist_dir, args.force,
                       only=args.only.split(",") if args.only else None, num_process=args.num_process, seed=args.seed,
                       cifar10_dir=args.cifar10_dir)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"run_all: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
