"""Time to accuracy, airbench-style: how long from the process start until the ViT reaches 80 / 85 / 90 / 93% on
the CIFAR-10 test set, over several seeds, each run alone.

    python ../shared/data/cifar10/to_batches.py /tmp/c10                    # once: the real images as pickles
    python benchmarks/time_to_accuracy.py --data_dir /tmp/c10               # recipe "vit", no flags, 3 seeds
    python benchmarks/time_to_accuracy.py --data_dir /tmp/c10 --recipe apphub --epochs 15    # any app option
    python benchmarks/time_to_accuracy.py --data_dir /tmp/c10 --fresh_cache # as on a fresh machine, on any
    python benchmarks/time_to_accuracy.py --budget tiny                     # CPU smoke test on generated data

Each run is a new process of FastEstimator's command line (`fastestimator train apphub_vit/finetune.py
--from_scratch True --data_dir D --seed K ...`, or `--cli` as given): what a user types, so the clock starts where a
user's does, before Python imports anything, and counts start-up (imports, data loading, model build, compilation and
CUDA-graph capture) and every eval. The app evaluates on the test images after every epoch and its `run_record.json`
holds the time at the end of each eval; the first eval at or above a target is the time to that target. Every option
this script does not know goes to the app as it is (`--epochs 50 --lr 3e-3`), so the app checks it; without
--epochs, the recipe's epochs (100 for "vit"; finetune.py alone trains one epoch, as the apphub finetunes).

Compilation: torch.compile keeps what it compiled in caches on disk, so a machine's first run compiles (a minute and
more on a GPU) and later runs mostly load. By default the runs use the machine's caches, as a user's runs do: the first
run of a series on a fresh machine is the cold one, the others warm. --fresh_cache gives each run empty caches of its
own (torch's inductor cache, which holds the compiled graphs, and Triton's kernel cache, in a new folder removed after
the run): every run then takes what a user's first run on a fresh machine takes, on any machine, side by side with
warm runs of the same host.

Printed: per seed (each row also as soon as its run ends) and as mean / sample standard deviation, the wall time
(from process start) at which each target was first reached (or "-" if never), the final test accuracy, and the run's
split: start-up (process start to the first epoch, less the next; of it, FastEstimator's warm-up in `fit()`, where
torch.compile traces the graphs and compiles them or loads them from its cache), the distillation teacher's training
(a column only where a recipe has one), train, eval (and the first eval epoch alone), and the rest (between epochs:
traces, checkpoints) to the process's exit; with test-time augmentation (recipe "vit"'s `tta`), also the final
accuracy of the same model on single images (`accuracy_no_tta`) and, with the shifted views, on flips alone
(`accuracy_flip`).
Exits 1 if a run fails, after the row of a failed run that got as far as writing its record.

Curves: as each run ends, its test accuracy after every epoch, against seconds from its process's start, is added to
OUT/curves.csv and drawn in OUT/curves.png, one line per run. Several series (say, two recipes) in one picture:

    python benchmarks/time_to_accuracy.py --plot runs/vit runs/apphub --png both.png

Measured: docs/performance.md.
"""
import argparse
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from apphub_vit.recipes import VIT_RECIPES  # noqa: E402
APP = os.path.join(REPO, "apphub_vit", "finetune.py")
TARGETS = (0.80, 0.85, 0.90, 0.93)
# The tiny budget: generated CIFAR-shaped data and a 1-layer ViT, a few seconds per run on a CPU (plumbing only).
TINY = ["--dataset", "synthetic", "--synthetic_size", "[64, 32]", "--epochs", "2", "--batch_size", "16",
        "--num_layers", "1", "--em_dim", "16", "--num_heads", "2", "--ff_dim", "32", "--patch_size", "8",
        "--augment", "apphub", "--teacher_epochs", "1"]  # recipe "vit"'s distillation teacher, for 1 epoch


def default_cli() -> List[str]:
    """FastEstimator's command line: the `fastestimator` script where it is installed, else the same from Python."""
    script = shutil.which("fastestimator")
    return [script] if script else [sys.executable, "-c",
                                    "import sys; from fastestimator.cli.main import run_main; run_main(sys.argv[1:])"]


def run_once(cli: Sequence[str], app_args: Sequence[str], save_dir: str, seed: int, log: str,
             fresh_cache: bool = False) -> Dict:
    """One training process; returns its record with `wall` (seconds from the start to the exit) and `t0`.
    fresh_cache: the process gets empty compile caches of its own (`compile_cache_env`), removed when it ends."""
    command = [*cli, "train", APP, "--from_scratch", "True", "--seed", str(seed), "--save_dir", save_dir, *app_args]
    print(f"seed {seed}: {shlex.join(command)}" + (" (empty compile caches)" if fresh_cache else ""), flush=True)
    cache = tempfile.mkdtemp(prefix=f"compile-cache-seed{seed}-") if fresh_cache else None
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               **(compile_cache_env(cache) if cache else {}))
    t0 = time.time()
    try:
        with open(log, "w") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)  # this checkout
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    wall = time.time() - t0
    path = os.path.join(save_dir, "run_record.json")
    record = None
    if not code or os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        record.update(wall=wall, t0=t0)
    if code:
        with open(log) as f:
            tail = "".join(f.readlines()[-20:])
        raise RunFailed(f"seed {seed}: the run exited with {code} (log {log}):\n{tail}", record)
    return record


def compile_cache_env(folder: str) -> Dict[str, str]:
    """The environment that points torch.compile's caches into `folder`: inductor's (the compiled graphs, and the
    AOTAutograd and FX graph caches within it) and Triton's (the compiled kernels)."""
    return {"TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(folder, "triton")}


class RunFailed(RuntimeError):
    """A run that exited with an error; `record` is the run record it wrote (None if none: the app writes it when fit()
    ends), so a run that fails after its training still shows what it measured."""
    def __init__(self, message: str, record: Optional[Dict]) -> None:
        super().__init__(message)
        self.record = record


def first_eval(record: Dict, target: float) -> Optional[Dict]:
    """A run record's first eval entry whose accuracy reached `target` (a fraction), or None if none did."""
    key = record["metrics"]["accuracy_key"] or "accuracy"
    return next((e for e in record["eval"] if e["metrics"].get(key, -1.0) >= target), None)


def summarize(record: Dict, targets: Sequence[float]) -> Dict[str, Optional[float]]:
    """Seconds from process start to each target (None if never reached), final accuracy, and the run's split."""
    key = record["metrics"]["accuracy_key"] or "accuracy"
    evals = [e for e in record["eval"] if key in e["metrics"]]
    out: Dict[str, Optional[float]] = {}
    for target in targets:
        first = first_eval(record, target)
        out[f"{target:.0%}"] = None if first is None else first["time"] - record["t0"]
    timing = record["timing"]
    teacher = (record["hparams"].get("teacher") or {}).get("seconds")  # a distilling recipe's teacher, before fit()
    startup = timing["fit_started"] - record["t0"] - (teacher or 0.0)
    last = evals[-1]["metrics"] if evals else {}  # with TTA: the same model on single images, and on flips alone
    # of the start-up, FastEstimator's warm-up in fit(): the graphs traced, compiled or loaded from the compile cache
    out.update(final=record["final_accuracy"], wall=record["wall"], startup=startup,
               warmup=timing.get("warmup_seconds"), teacher=teacher,
               train=timing["train_seconds"], eval=timing["eval_seconds"],
               # the first eval epoch alone: where a compile or a first allocation of the eval shapes would show
               **{"first eval": record["eval"][0].get("seconds") if record["eval"] else None},
               other=record["wall"] - startup - (teacher or 0.0) - timing["train_seconds"] - timing["eval_seconds"],
               **{"final, no TTA": last.get("accuracy_no_tta"), "final, flip only": last.get("accuracy_flip")})
    return out


CURVE_COLUMNS = ("series", "seed", "epoch", "seconds_from_process_start", "test_accuracy")


def curve_rows(record: Dict, seed: int) -> List[Dict]:
    """One row per eval of a run (needs the `t0` that run_once adds): its seconds from the process's start and its
    test accuracy. The series is the recipe and the options given to it, as the record has them."""
    key = record["metrics"]["accuracy_key"] or "accuracy"
    hparams = record["hparams"]
    options = " ".join(f"--{k} {v}" for k, v in sorted(hparams.get("overrides", {}).items()) if k != "epochs")
    series = " ".join(filter(None, [hparams["recipe"]["name"], options]))
    return [dict(series=series, seed=seed, epoch=e["epoch"],
                 seconds_from_process_start=round(e["time"] - record["t0"], 3), test_accuracy=e["metrics"][key])
            for e in record["eval"] if key in e["metrics"]]


def write_curves(rows: List[Dict], out: str, targets: Sequence[float] = TARGETS) -> None:
    """OUT/curves.csv with every run's rows so far, and OUT/curves.png drawn from it."""
    with open(os.path.join(out, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot_curves(rows, os.path.join(out, "curves.png"), targets)


def read_curves(folders: Sequence[str]) -> List[Dict]:
    """The rows of each folder's curves.csv (a series written by this script), numbers as numbers. A series found in
    more than one folder (the same recipe run by two versions of the code, or on two machines) is named after each
    folder too ("FOLDER: series"), so that the picture keeps them apart."""
    per_folder = []
    for folder in folders:
        path = os.path.join(folder, "curves.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist: --plot takes folders this script wrote with --out")
        with open(path, newline="") as f:
            per_folder.append([dict(row, seed=int(row["seed"]), epoch=int(row["epoch"]),
                                    seconds_from_process_start=float(row["seconds_from_process_start"]),
                                    test_accuracy=float(row["test_accuracy"])) for row in csv.DictReader(f)])
    found = Counter(series for rows in per_folder for series in {row["series"] for row in rows})
    for folder, rows in zip(folders, per_folder):
        for row in rows:
            if found[row["series"]] > 1:
                row["series"] = f"{os.path.basename(os.path.normpath(folder))}: {row['series']}"
    return [row for rows in per_folder for row in rows]


def plot_curves(rows: List[Dict], png: str, targets: Sequence[float] = TARGETS) -> None:
    """Test accuracy against seconds from the process start (left) and against epochs (right), one line per run,
    one colour per series; the targets as dotted lines."""
    import matplotlib
    matplotlib.use("Agg")  # a file, not a window
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = {}
    for row in rows:
        colours.setdefault(row["series"], f"C{len(colours) % 10}")
    runs = list(dict.fromkeys((r["series"], r["seed"]) for r in rows))
    for series, seed in runs:
        run = sorted((r for r in rows if r["series"] == series and r["seed"] == seed), key=lambda r: r["epoch"])
        seeds = [s for name, s in runs if name == series]
        label = f"{series} ({len(seeds)} run{'s' if len(seeds) > 1 else ''})" if seed == seeds[0] else None
        for ax, x in zip(axes, ("seconds_from_process_start", "epoch")):
            ax.plot([r[x] for r in run], [r["test_accuracy"] for r in run], color=colours[series], alpha=0.7,
                    label=label)
    for ax, xlabel in zip(axes, ("seconds from process start", "epoch")):
        for target in targets:
            ax.axhline(target, color="grey", linestyle=":", linewidth=0.8)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    low = min(r["test_accuracy"] for r in rows)
    axes[0].set(ylabel="test accuracy", ylim=(max(0.0, min(low, min(targets)) - 0.05), 1.0), xlim=(0, None))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=min(len(colours), 3), fontsize=8,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle("Time to accuracy: every eval of every run")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def fmt(value: Optional[float], column: str) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if column.startswith("final") else f"{value:.1f}"


def table(rows: List[Dict[str, Optional[float]]], targets: Sequence[float],
          seeds: Optional[Sequence[int]] = None) -> str:
    teacher = ["teacher"] if any(row["teacher"] is not None for row in rows) else []  # only where one was trained
    warmup = ["warmup"] if any(row.get("warmup") is not None for row in rows) else []  # records before it: none
    single = [c for c in ("final, no TTA", "final, flip only") if any(row.get(c) is not None for row in rows)]  # TTA
    columns = [f"{t:.0%}" for t in targets] + ["final", "wall", "startup", *warmup, *teacher, "train", "eval",
                                               "first eval", "other", *single]
    names = {"warmup": "of which warm-up"}
    head = ["run"] + [f"to {c} (s)" if c.endswith("%") else (c if c.startswith("final") else f"{names.get(c, c)} (s)")
                      for c in columns]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * len(columns)]
    for seed, row in zip(seeds or range(len(rows)), rows):
        lines.append(f"| seed {seed} | " + " | ".join(fmt(row[c], c) for c in columns) + " |")
    if len(rows) > 1:
        means, stds = [], []
        for c in columns:
            values = [row[c] for row in rows if row[c] is not None]
            reached = len(values) == len(rows)
            means.append(fmt(statistics.mean(values), c) + ("" if reached else f" ({len(values)}/{len(rows)})")
                         if values else "-")
            stds.append(fmt(statistics.stdev(values), c) if len(values) > 1 else "-")
        lines.append("| mean | " + " | ".join(means) + " |")
        lines.append("| std | " + " | ".join(stds) + " |")
    return "\n".join(lines)


def app_arguments(parser: argparse.ArgumentParser, budget: str, data_dir: Optional[str],
                  app_args: List[str]) -> List[str]:
    """The app's arguments for a budget: the tiny configuration, or the data folder; and the recipe's epochs unless
    given (finetune.py's own default is the apphub's one epoch). Errors go through `parser`."""
    if budget == "tiny":
        app_args = TINY + app_args
    elif data_dir is None:
        parser.error("--data_dir is needed: a local CIFAR-10 folder (python ../shared/data/cifar10/to_batches.py "
                     "/tmp/c10 writes one); or --budget tiny for a smoke test on generated data")
    else:
        app_args = ["--data_dir", os.path.abspath(data_dir)] + app_args
    if "--epochs" not in app_args:
        recipe = app_args[app_args.index("--recipe") + 1] if "--recipe" in app_args[:-1] else "vit"
        if recipe not in VIT_RECIPES:
            parser.error(f"--recipe {recipe!r} is not one of {', '.join(VIT_RECIPES)}")
        app_args = app_args + ["--epochs", str(VIT_RECIPES[recipe].epochs)]
    return app_args


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="a local CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("--seeds", type=int, default=3, help="runs, one after another (default 3)")
    parser.add_argument("--first_seed", type=int, default=0,
                        help="the first run's seed (default 0): the runs are seeds K..K+N-1, so a "
                             "series can go on in another process")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS),
                        help="test accuracies to time, as fractions (default 0.8,0.85,0.9,0.93)")
    parser.add_argument("--budget", choices=("full", "tiny"), default="full",
                        help="full: the app as asked on --data_dir; tiny: generated data, a 1-layer ViT (smoke test)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a new temporary folder); must not "
                                                    "hold earlier runs")
    parser.add_argument("--fresh_cache", action="store_true",
                        help="give each run empty compile caches of its own (removed after it): the time of a first "
                             "run on a fresh machine, on any machine")
    parser.add_argument("--cli", default=None, help="the command that runs FastEstimator's command line (default: "
                                                    "`fastestimator`)")
    parser.add_argument("--plot", nargs="+", default=None, metavar="FOLDER",
                        help="train nothing: draw the curves.csv of these folders (earlier --out folders) into --png")
    parser.add_argument("--png", default=None, help="with --plot: the picture to write (must not exist yet)")
    args, app_args = parser.parse_known_args(argv)
    try:
        targets = [float(t) for t in args.targets.split(",")]
    except ValueError:
        parser.error(f"--targets must be fractions separated by commas (e.g. 0.8,0.9), got {args.targets!r}")
    if args.plot is not None or args.png is not None:
        return plot_only(parser, args, app_args, targets)
    if args.seeds < 1 or args.first_seed < 0:
        parser.error(f"--seeds must be at least 1 and --first_seed at least 0, got {args.seeds} and {args.first_seed}")
    app_args = app_arguments(parser, args.budget, args.data_dir, app_args)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="time_to_accuracy-"))
    os.makedirs(out, exist_ok=True)
    taken = [name for name in os.listdir(out) if name.startswith(("seed", "curves"))]
    if taken:
        parser.error(f"--out '{out}' already holds runs ({', '.join(sorted(taken))}); choose another folder")
    cli = shlex.split(args.cli) if args.cli else default_cli()
    rows, curves, seeds = [], [], range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:
        try:
            record = run_once(cli, app_args, os.path.join(out, f"seed{seed}"), seed,
                              os.path.join(out, f"seed{seed}.log"), fresh_cache=args.fresh_cache)
        except RunFailed as err:
            print(err, file=sys.stderr)
            if err.record is not None and err.record["eval"]:  # what it measured before failing, marked as such
                row = summarize(err.record, targets)
                write_curves(curves + curve_rows(err.record, seed), out, targets)
                print(f"seed {seed} failed after fit() wrote its record; its figures (wall: to the failure):\n"
                      f"{table([row], targets, [seed]).splitlines()[-1]}", flush=True)
            return 1
        rows.append(summarize(record, targets))
        curves += curve_rows(record, seed)
        write_curves(curves, out, targets)  # after every run: a series cut off later keeps its finished runs' curves
        print(f"seed {seed}: final {rows[-1]['final']:.2%}, {rows[-1]['wall']:.1f} s from process start", flush=True)
        # each run's row as soon as it ends: the record lacks the process's start, so a series cut off later (a GPU
        # host taken back) keeps the rows of the runs that ended
        print(table(rows[-1:], targets, [seed]).splitlines()[-1], flush=True)
    device = record["device"].get("name", "?") if isinstance(record.get("device"), dict) else record.get("device")
    print(f"\ntime to test accuracy, seconds from process start; {record['app']}, {record['dataset']}, "
          f"{record['schedule']['epochs']} epochs of batch {record['schedule']['batch_size']}, device {device}; "
          f"{'each with empty compile caches' if args.fresh_cache else 'compile caches of the machine'}; "
          f"runs in {out}\n")
    print(table(rows, targets, seeds))
    print(f"\ncurves: {os.path.join(out, 'curves.csv')}, {os.path.join(out, 'curves.png')}")
    return 0


def plot_only(parser: argparse.ArgumentParser, args: argparse.Namespace, app_args: List[str],
              targets: Sequence[float]) -> int:
    """--plot FOLDER ... --png FILE: one picture of several series, training nothing."""
    if not args.plot or not args.png:
        parser.error("--plot and --png go together: --plot FOLDER [FOLDER ...] --png FILE")
    if app_args:
        parser.error(f"--plot trains nothing, so it takes no app options; got {' '.join(app_args)}")
    if os.path.exists(args.png):
        parser.error(f"--png '{args.png}' already exists; choose another file (nothing is overwritten)")
    try:
        rows = read_curves(args.plot)
    except FileNotFoundError as err:
        parser.error(str(err))
    if not rows:
        parser.error(f"no evals in the curves.csv of {', '.join(args.plot)}")
    plot_curves(rows, args.png, targets)
    print(f"{len(rows)} evals of {len({(r['series'], r['seed']) for r in rows})} runs drawn in {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
