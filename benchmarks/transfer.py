"""Does pretraining transfer? Pretrain the ViT on synthetic CIFAR-100, then finetune it on synthetic CIFAR-10 for one
epoch from the pretrained encoder and, with the same budget, from random weights; print both accuracies.

    python benchmarks/transfer.py --budget cpu                 # a few minutes on a 2-core CPU
    python benchmarks/transfer.py --budget gpu                 # the apps' full-size ViT (3.2M), on a GPU
    python benchmarks/transfer.py --budget cpu --encoder runs/transfer/vit_pretrain/vit_encoder.pt   # reuse one

The runs are those of `apphub_vit.run_all` (same models, data sizes and arguments per budget: see its BUDGETS), except
that each CIFAR-10 run trains for exactly one epoch. Both CIFAR-10 starts train with the same steps, batch, learning
rate schedule, augmentation and data, under each of --seeds seeds (the seed fixes the new head, the data order and the
augmentation draws; the scratch run's encoder too). Accuracy is on the synthetic CIFAR-10 eval images after that one
epoch (each run's `run_record.json`). Every run's folder stays in --out. Exits 1 if the pretrained start does not win
on average, so a regression in transfer shows.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apphub_vit.records import RECORD_FILE, read_record  # noqa: E402
from apphub_vit.run_all import BUDGETS, Plan, make_plans, run_plan  # noqa: E402


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


def accuracy_of(plan: Plan) -> float:
    return float(read_record(os.path.join(plan.kwargs["save_dir"], RECORD_FILE))["final_accuracy"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--out", default=None, help="folder for every run (default: a new temporary folder); must "
                        "not already hold these runs")
    parser.add_argument("--encoder", default=None, help="an existing vit_encoder.pt of this budget's ViT: skip "
                        "pretraining")
    parser.add_argument("--seeds", type=int, default=3, help="finetuning seeds per start (default 3)")
    parser.add_argument("--num_process", type=int, default=None, help="pipeline workers (default: run_all's)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="vit-transfer-"))
    num_process = args.num_process if args.num_process is not None or args.budget == "gpu" else 0
    start = time.perf_counter()

    encoder, pre_line = args.encoder, "pretraining: skipped (--encoder given)"
    if encoder is None:
        pre = make_plans(args.budget, out, None, False, num_process)[0]
        pre_seconds = run_plan(pre, seed=0)
        record = read_record(os.path.join(pre.kwargs["save_dir"], RECORD_FILE))
        encoder = os.path.join(pre.kwargs["save_dir"], "vit_encoder.pt")
        pre_line = (f"pretraining on synthetic CIFAR-100: {record['hparams']['epochs']} epochs, accuracy "
                    f"{record['final_accuracy']:.4f} (chance 0.01), {pre_seconds:.0f} s")
    elif not os.path.isfile(encoder):
        print(f"--encoder {encoder}: no such file (expected a vit_encoder.pt written by apphub_vit.pretrain)")
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
    for name in ("pretrained", "scratch"):
        print(f"| {name} | {', '.join(f'{a:.4f}' for a in results[name])} | {statistics.mean(results[name]):.4f} | "
              f"{statistics.mean(seconds[name]):.1f} |")
    gain = statistics.mean(results["pretrained"]) - statistics.mean(results["scratch"])
    wins = sum(p > s for p, s in zip(results["pretrained"], results["scratch"]))
    print(f"\npretrained - scratch: {gain:+.4f} mean accuracy; pretrained wins {wins} of {args.seeds} seeds. "
          f"Total {time.perf_counter() - start:.0f} s; runs in {out}")
    return 0 if gain > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
