"""Levers on the validation split: variants of a recipe against its control, several seeds, several runs at once on
one GPU, and a verdict by a rule fixed before the runs start.

    python ../shared/data/cifar10/to_batches.py /tmp/c10                    # once: the real images as pickles
    python benchmarks/sweep.py --data_dir /tmp/c10 --out runs/sweep --seeds 2 --parallel 4 \\
        --variant "lr3e-3=--lr 3e-3 --warmup_epochs 15" --variant "deeper=--num_layers 7 --ff_dim 384"
    python benchmarks/sweep.py --budget tiny --variant "wd=--weight_decay 0.1"     # CPU smoke test

Every run is a new process of FastEstimator's command line (`fastestimator train apphub_vit/finetune.py --from_scratch
True --validation 5000 --seed K --save_dir OUT/NAME-sK [FLAGS]`, or `--cli` as given), the control with no flags and
each `--variant NAME=FLAGS` with its flags on top of the recipe's defaults, seeds 0..N-1, at most `--parallel` at once.
The runs evaluate on the last `--validation` training images (5,000) and never on the test set: this is where
hyperparameters are chosen (docs/results-cifar10.md). Runs that share a GPU slow each other, so their times say nothing
about speed (benchmarks/time_to_accuracy.py measures that, one run at a time). Every option this script does not know
goes to every run (`--epochs 30`).

The rule (docs/results-cifar10.md's, for every lever since distillation): a variant wins if the mean over its seeds
of its last-epoch validation accuracy beats the control's mean by at least `--margin` points (0.3); of the winners,
the one with the highest mean is picked, else the recipe stays as it is.

Written to OUT: `sweep.md` (the command, per run the last and best validation accuracy, per variant the mean, its lead
over the control and the verdict, and per run the first epoch at `--target` validation accuracy, 90%: the measure of
a lever on time to a good model, or of a shorter `--epochs` budget), `sweep.csv` (every eval: variant, seed, epoch,
accuracy), and `comparison.md` / `comparison.png` (`apphub_vit.compare`: the curves). A run whose folder already
holds a finished `run_record.json` made with the same command is reused, so a sweep cut off can be started again with
the same command; any other run folder in the way stops it before anything starts. Exits 1 if a run fails (the
others go on).
"""
import argparse
import csv
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from apphub_vit import compare  # noqa: E402
from apphub_vit.records import read_record  # noqa: E402
from time_to_accuracy import APP, app_arguments, default_cli, first_eval  # noqa: E402

CONTROL = "control"
PLAN = "sweep.json"  # each run's command, to tell a finished run of this sweep from another one
# set by the sweep for every run: a variant may not change them
OWN_FLAGS = ("--seed", "--save_dir", "--validation", "--data_dir", "--from_scratch")


def parse_variant(text: str) -> Tuple[str, List[str]]:
    """"NAME=FLAGS" -> (NAME, [flags]), with a clear error for what cannot be a variant."""
    name, sep, flags = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name == CONTROL:
        raise ValueError(f"--variant {text!r}: write NAME=FLAGS, e.g. \"lr3e-3=--lr 3e-3\", with NAME made of letters, "
                         f"digits and _ . + - (not {CONTROL!r}, the run without flags)")
    args = shlex.split(flags)
    if not args or not args[0].startswith("--"):
        raise ValueError(f"--variant {text!r} has no app flags after '=': give at least one, e.g. \"{name}=--lr 1e-3\"")
    own = [a for a in args if a.split("=")[0] in OWN_FLAGS]
    if own:
        raise ValueError(f"--variant {text!r} sets {', '.join(own)}, which the sweep sets for every run: leave them "
                         f"out (--validation and --data_dir are the sweep's own options)")
    return name, args


def verdict(last: Dict[str, List[float]], margin: float) -> Tuple[Dict[str, float], Optional[str]]:
    """Each variant's lead over the control (mean last-epoch accuracy, in points) and the pick (None: no winner)."""
    control = statistics.mean(last[CONTROL])
    leads = {name: 100 * (statistics.mean(values) - control) for name, values in last.items() if name != CONTROL}
    winners = [name for name, lead in leads.items() if lead >= margin - 1e-9]
    return leads, max(winners, key=lambda n: leads[n]) if winners else None


def _finished(save_dir: str, command: List[str], plan: Dict[str, List[str]]) -> Optional[Dict]:
    """The record of a run already made with this command, or None if it is still to run; raises if the folder holds
    something else (a run of another command, or one that did not finish)."""
    record_path = os.path.join(save_dir, "run_record.json")
    if not os.path.exists(save_dir):
        return None
    name = os.path.basename(save_dir)
    if plan.get(name) != command:
        raise FileExistsError(f"'{save_dir}' holds a run of another command; choose another --out, or remove it")
    if not os.path.exists(record_path):
        raise FileExistsError(f"'{save_dir}' holds a run that did not finish; remove it to run it again")
    record = read_record(record_path)
    if not record.get("eval") or record.get("final_accuracy") is None:
        raise FileExistsError(f"'{record_path}' has no eval accuracy; remove '{save_dir}' to run it again")
    return record


def run_all(commands: Dict[str, List[str]], out: str, parallel: int) -> Tuple[Dict[str, Dict], List[str]]:
    """Start the runs not yet made, at most `parallel` at once; returns {name: record} and the names that failed."""
    plan_path = os.path.join(out, PLAN)
    plan = {}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            plan = json.load(f)
    records = {}
    for name, command in commands.items():
        record = _finished(os.path.join(out, name), command, plan)
        if record is not None:
            records[name] = record
            print(f"{name}: reused (finished earlier), last {record['final_accuracy']:.2%}", flush=True)
    plan.update(commands)
    with open(plan_path, "w") as f:
        json.dump(plan, f, indent=1)
    todo = [name for name in commands if name not in records]
    running: Dict[str, Tuple[subprocess.Popen, float]] = {}
    failed, total, start = [], len(todo), time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    while todo or running:
        while todo and len(running) < parallel:
            name = todo.pop(0)
            with open(os.path.join(out, f"{name}.log"), "w") as log:
                process = subprocess.Popen(commands[name], stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            running[name] = (process, time.time())
            print(f"{name}: started ({shlex.join(commands[name])})", flush=True)
        time.sleep(0.5)
        for name, (process, started) in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            done = total - len(todo) - len(running)
            took = f"{time.time() - started:.0f} s; {done}/{total} done after {time.time() - start:.0f} s"
            record_path = os.path.join(out, name, "run_record.json")
            if process.returncode or not os.path.exists(record_path):
                with open(os.path.join(out, f"{name}.log")) as f:
                    tail = "".join(f.readlines()[-15:])
                print(f"{name}: FAILED with exit code {process.returncode} ({took}); the end of "
                      f"{os.path.join(out, name + '.log')}:\n{tail}", file=sys.stderr, flush=True)
                failed.append(name)
                continue
            records[name] = read_record(record_path)
            print(f"{name}: last {records[name]['final_accuracy']:.2%} ({took})", flush=True)
    return records, failed


def report(variants: Dict[str, List[str]], seeds: Sequence[int], records: Dict[str, Dict], margin: float,
           command: str, target: float = 0.9) -> Tuple[str, Optional[str]]:
    """sweep.md's text and the pick; a variant missing a seed's run is shown without a mean or a verdict. Beside
    the accuracies, the epoch at which each run first reached `target`: a lever can win on time to a good model
    (fewer epochs to it) rather than on the last epoch's accuracy, and the rule above says nothing about that."""
    last = {name: [records[f"{name}-s{seed}"]["final_accuracy"] for seed in seeds] for name in variants
            if all(f"{name}-s{seed}" in records for seed in seeds)}
    leads, pick = verdict(last, margin) if CONTROL in last else ({}, None)
    lines = [f"`{command}`", "", "| variant | flags | " + " | ".join(f"seed {s}, last (best)" for s in seeds)
             + f" | mean, last | vs control (points) | first epoch at {target:.0%} |",
             "| --- | --- |" + " ---: |" * (len(seeds) + 3)]
    for name, flags in variants.items():
        runs = [records.get(f"{name}-s{seed}") for seed in seeds]
        cells = [f"{r['final_accuracy']:.2%} ({r['best_accuracy']:.2%})" if r is not None else "failed" for r in runs]
        mean = f"{statistics.mean(last[name]):.2%}" if name in last else "-"
        lead = f"{leads[name]:+.2f}" if name in leads else "-"
        reached = [first_eval(r, target) if r is not None else None for r in runs]
        epochs = ", ".join("-" if e is None else str(e["epoch"]) for e in reached)
        lines.append(f"| {name} | {shlex.join(flags) or '(none)'} | {' | '.join(cells)} | {mean} | {lead} | "
                     f"{epochs} |")
    if CONTROL not in last:
        return "\n".join(lines) + "\n\nNo verdict: the control did not finish every seed.\n", None
    rule = (f"The rule, fixed before the runs: a variant wins if its mean last-epoch validation accuracy over seed"
            f"{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} beats the control's by at least "
            f"{margin:g} points; the best winner is picked.")
    outcome = f"**Picked: {pick}** ({leads[pick]:+.2f} points)." if pick else "No variant won: the recipe stays."
    return "\n".join(lines) + f"\n\n{rule} {outcome}\n", pick


def write_csv(path: str, records: Dict[str, Dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "seed", "epoch", "validation_accuracy"])
        for name, record in sorted(records.items()):
            variant, seed = name.rsplit("-s", 1)
            for entry in record["eval"]:
                if "accuracy" in entry.get("metrics", {}):
                    writer.writerow([variant, seed, entry["epoch"], f"{entry['metrics']['accuracy']:.4f}"])


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="a local CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a lever: a name and the app flags it adds (repeat for more)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per variant and of the control (default 2)")
    parser.add_argument("--parallel", type=int, default=4, help="runs at once (default 4)")
    parser.add_argument("--validation", type=int, default=None,
                        help="held-out training images the runs evaluate on, the last ones (default 5000; 16 with "
                             "--budget tiny)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="the validation accuracy (a fraction) whose first epoch the report gives per run (0.9)")
    parser.add_argument("--margin", type=float, default=0.3,
                        help="points a variant's mean must beat the control's by to win (default 0.3)")
    parser.add_argument("--budget", choices=("full", "tiny"), default="full",
                        help="full: the app on --data_dir; tiny: generated data, a 1-layer ViT (smoke test)")
    parser.add_argument("--out", required=True, help="folder for the runs and the report")
    parser.add_argument("--cli", default=None, help="the command that runs FastEstimator's command line (default: "
                                                    "`fastestimator`)")
    args, app_args = parser.parse_known_args(argv)
    if args.validation is None:
        args.validation = 16 if args.budget == "tiny" else 5000
    if not args.variant:
        parser.error("give at least one --variant NAME=FLAGS (the control, with no flags, always runs)")
    if args.seeds < 1 or args.parallel < 1 or args.validation < 1:
        parser.error(f"--seeds, --parallel and --validation must be at least 1, got {args.seeds}, {args.parallel} "
                     f"and {args.validation} (hyperparameters are chosen on held-out training images, never on the "
                     f"test set)")
    if not 0.0 < args.target <= 1.0:
        parser.error(f"--target is a validation accuracy as a fraction (0.9 for 90%), got {args.target:g}")
    variants: Dict[str, List[str]] = {CONTROL: []}
    for text in args.variant:
        try:
            name, flags = parse_variant(text)
        except ValueError as err:
            parser.error(str(err))
        if name in variants:
            parser.error(f"--variant {name!r} is given twice")
        variants[name] = flags
    own = [a for a in app_args if a.split("=")[0] in OWN_FLAGS]
    if own:
        parser.error(f"{', '.join(own)}: the sweep sets these for every run (--validation and --data_dir are its own "
                     f"options)")
    app_args = app_arguments(parser, args.budget, args.data_dir, app_args)
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out '{out}' is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    reports = [os.path.join(out, name) for name in ("sweep.md", "sweep.csv") + compare.OUTPUT_FILES]
    cli = shlex.split(args.cli) if args.cli else default_cli()
    commands = {f"{name}-s{seed}": [*cli, "train", APP, "--from_scratch", "True", "--validation", str(args.validation),
                                    "--seed", str(seed), "--save_dir", os.path.join(out, f"{name}-s{seed}"),
                                    *app_args, *flags]
                for name, flags in variants.items() for seed in range(args.seeds)}
    try:
        records, failed = run_all(commands, out, args.parallel)
    except FileExistsError as err:
        parser.error(str(err))
    command = shlex.join(["python", "benchmarks/sweep.py", *(argv if argv is not None else sys.argv[1:])])
    text, _ = report(variants, range(args.seeds), records, args.margin, command, args.target)
    print("\n" + text)
    for path in reports:  # this sweep's own report, written again with every run it has now
        if os.path.exists(path):
            os.remove(path)
    with open(reports[0], "w") as f:
        f.write(f"# Sweep on the validation split ({args.validation} held-out training images)\n\n{text}")
    write_csv(reports[1], records)
    if records:
        compare.compare([os.path.join(out, name) for name in commands if name in records], out, warn=print)
    print(f"written: {', '.join(p for p in reports if os.path.exists(p))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
