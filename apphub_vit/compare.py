"""Compare app runs: a Markdown table and a picture of their eval curves, from the runs' `run_record.json` files.

    python -m apphub_vit.compare runs/pretrain-a runs/finetune-b --out reports/       # two run folders
    python -m apphub_vit.compare OUT --out OUT                                         # every run folder inside OUT
    python -m apphub_vit.compare some/run_record.json other.json --out reports/ --force

Each RUN_DIR may be
* a run folder holding `run_record.json` (what `apphub_vit.records.RunRecorder` writes into an app's save_dir);
* a JSON file (a record under any name);
* a folder of run folders: its direct subfolders that hold a `run_record.json`, in name order (subfolders without one
  are named on stderr and left out; deeper folders are not searched).

It writes `OUT/comparison.md` (one row per run: app, dataset, epochs, best and final eval accuracy, final eval loss,
train time, train images/s, parameters total/trainable; then the runs' notes and devices) and `OUT/comparison.png`
(eval accuracy and eval loss against training step, one line per run, the two panels sharing the step axis), and prints
the table. Existing output files are never replaced unless --force is given.

A missing, empty, truncated or foreign (another tool's) JSON file stops the command with an error naming the file;
with --skip-bad it is named in a warning and left out. A run that lacks a metric (the MNIST autoencoder has no
accuracy), or any other field, gets a blank cell and no curve in that panel.
"""
import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from apphub_vit.records import RECORD_FILE, RecordError, read_record

OUTPUT_FILES = ("comparison.md", "comparison.png")
COLUMNS = ("run", "app", "dataset", "epochs", "best acc", "final acc", "final loss", "train time (s)", "train img/s",
           "params", "trainable")

Run = Tuple[str, Dict[str, Any]]  # (label, record)


def find_records(arg: str) -> Tuple[List[str], List[str]]:
    """The record files a RUN_DIR argument stands for, and notes about subfolders left out (see the module doc)."""
    if not os.path.isdir(arg):
        return [arg], []  # a file, or a missing path: read_record says which problem it has
    own = os.path.join(arg, RECORD_FILE)
    if os.path.exists(own):
        return [own], []
    found, left_out = [], []
    for name in sorted(os.listdir(arg)):
        sub = os.path.join(arg, name)
        if os.path.isdir(sub):
            if os.path.exists(os.path.join(sub, RECORD_FILE)):
                found.append(os.path.join(sub, RECORD_FILE))
            else:
                left_out.append(f"'{sub}' holds no {RECORD_FILE} (an unfinished run?); left out")
    if not found:
        raise RecordError(f"'{arg}' holds no {RECORD_FILE}, and none of its subfolders does: pass a run's save_dir, a "
                          f"record file, or a folder of run folders.")
    return found, left_out


def load_runs(args: Sequence[str], skip_bad: bool = False, warn=print) -> List[Run]:
    """(label, record) for every run named by `args`, in order. A bad record raises `RecordError`, or with `skip_bad`
    is reported through `warn` and left out. Labels are the runs' folder names, made unique."""
    runs: List[Run] = []
    for arg in args:
        try:
            paths, notes = find_records(arg)
        except RecordError as err:
            if not skip_bad:
                raise
            warn(f"warning: {err} Skipped.")
            continue
        for note in notes:
            warn(f"note: {note}")
        for path in paths:
            try:
                record = read_record(path)
            except RecordError as err:
                if not skip_bad:
                    raise
                warn(f"warning: {err} Skipped.")
                continue
            runs.append((_label(record, path), record))
    labels: Dict[str, int] = {}
    unique = []
    for label, record in runs:  # two folders of the same name (from different parents) stay apart in table and legend
        labels[label] = labels.get(label, 0) + 1
        unique.append((label if labels[label] == 1 else f"{label} ({labels[label]})", record))
    return unique


def _label(record: Dict[str, Any], path: str) -> str:
    run = record.get("run")
    if isinstance(run, str) and run:
        return run
    return os.path.basename(os.path.dirname(os.path.abspath(path))) or record["app"]


def field(record: Dict[str, Any], *keys: str) -> Any:
    """record[k1][k2]..., or None where a level is missing or not a dict (an older or partial record)."""
    value: Any = record
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _number(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    number = _number(value)
    return "" if number is None else f"{number:{spec}}{suffix}"


def table_rows(runs: Sequence[Run]) -> List[List[str]]:
    """One row of cells per run, in COLUMNS order; a value the record lacks is an empty cell."""
    rows = []
    for label, record in runs:
        loss_key = field(record, "metrics", "loss_key")
        final_loss = _fmt(record.get("final_loss"), ".4f")
        epochs = field(record, "schedule", "train_epochs_run")
        rows.append([
            label,
            str(record.get("app") or ""),
            str(record.get("dataset") or ""),
            _fmt(epochs if epochs is not None else field(record, "schedule", "epochs"), ".0f"),
            _fmt(_percent(record.get("best_accuracy")), ".2f", "%"),
            _fmt(_percent(record.get("final_accuracy")), ".2f", "%"),
            f"{final_loss} ({loss_key})" if final_loss and isinstance(loss_key, str) else final_loss,
            _fmt(field(record, "timing", "train_seconds"), ".1f"),
            _fmt(field(record, "timing", "train_images_per_second"), ".1f"),
            _fmt(field(record, "parameters", "total"), ",.0f"),
            _fmt(field(record, "parameters", "trainable"), ",.0f"),
        ])
    return rows


def _percent(value: Any) -> Optional[float]:
    number = _number(value)
    return None if number is None else 100 * number


def markdown_table(runs: Sequence[Run]) -> str:
    """The comparison table in Markdown (numbers right-aligned)."""
    right = {"epochs", "best acc", "final acc", "final loss", "train time (s)", "train img/s", "params", "trainable"}
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in right else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


def markdown_report(runs: Sequence[Run]) -> str:
    """comparison.md: the table, then each run's notes and the devices the runs ran on."""
    parts = [
        "# Run comparison", "",
        markdown_table(runs), "",
        "Accuracy and loss are on the eval set, as each run's last and best eval epochs logged them; train time counts "
        "the train epochs only (no eval), train img/s = images trained on / train time; params are total and trainable "
        "over the run's models. A blank: the run did not record that value (e.g. no accuracy for an autoencoder).", ""
    ]
    notes = [f"- **{label}**: {note}" for label, record in runs for note in (record.get("notes") or [])
             if isinstance(note, str)]
    if notes:
        parts += ["Notes:", ""] + notes + [""]
    devices = {}
    for label, record in runs:
        device = field(record, "device") or {}
        cpus = f", {device['cpu_count']} CPUs" if isinstance(device, dict) and device.get("cpu_count") else ""
        desc = f"{field(record, 'device', 'type') or '?'} ({field(record, 'device', 'name') or '?'}{cpus}); " \
               f"torch {field(record, 'versions', 'torch') or '?'}, " \
               f"fastestimator {field(record, 'versions', 'fastestimator') or '?'}"
        devices.setdefault(desc, []).append(label)
    parts += ["Devices:", ""] + [f"- {desc}: {', '.join(labels)}" for desc, labels in devices.items()]
    return "\n".join(parts) + "\n"


def curve(record: Dict[str, Any], key: Optional[str]) -> Tuple[List[int], List[float]]:
    """(steps, values) of one eval metric over a run's eval epochs; entries without a number for it are left out."""
    steps, values = [], []
    if not isinstance(key, str):
        return steps, values
    for entry in record.get("eval") or []:
        value = _number(field(entry, "metrics", key))
        if value is not None and _number(entry.get("step")) is not None:
            steps.append(int(entry["step"]))
            values.append(value)
    return steps, values


def plot_curves(runs: Sequence[Run], path: str) -> None:
    """comparison.png: eval accuracy (top) and eval loss (bottom, log scale) against the training step."""
    import matplotlib
    matplotlib.use("Agg")  # a file, not a window: works on servers and in CI
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_acc = any_loss = False
    for index, (label, record) in enumerate(runs):
        style = dict(color=colors[index % len(colors)], marker="o", markersize=3, linewidth=1.5)
        steps, acc = curve(record, field(record, "metrics", "accuracy_key"))
        if steps:
            acc_ax.plot(steps, [100 * a for a in acc], label=label, **style)
            any_acc = True
        loss_key = field(record, "metrics", "loss_key")
        steps, loss = curve(record, loss_key)
        positive = [(s, v) for s, v in zip(steps, loss) if v > 0]  # the log axis cannot show a loss of 0
        if positive:
            loss_ax.plot(*zip(*positive), label=f"{label} ({loss_key})", **style)
            any_loss = True
    for ax, has, name in ((acc_ax, any_acc, "accuracy"), (loss_ax, any_loss, "loss")):
        if has:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, f"no run recorded an eval {name}", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, alpha=0.3)
    acc_ax.set_ylabel("eval accuracy (%)")
    if any_loss:
        loss_ax.set_yscale("log")  # cross-entropy over 100 classes and an MSE differ by orders of magnitude
    loss_ax.set_ylabel("eval loss (log scale)")
    loss_ax.set_xlabel("training step (each run's own global step)")
    acc_ax.set_title("Eval accuracy and loss per run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_outputs(out_dir: str, force: bool) -> List[str]:
    """The output paths; fails, before anything is read or written, if one exists and `force` is not set."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"--out '{out_dir}' is a file, not a folder.")
    paths = [os.path.join(out_dir, name) for name in OUTPUT_FILES]
    taken = [p for p in paths if os.path.exists(p)]
    if taken and not force:
        raise FileExistsError(f"{', '.join(repr(p) for p in taken)} already exist(s); not overwriting. Choose another "
                              f"--out, or pass --force to replace them.")
    return paths


def compare(run_dirs: Sequence[str], out_dir: str, skip_bad: bool = False, force: bool = False, warn=print,
            footer: str = "") -> Tuple[str, List[Run]]:
    """Read the runs, write OUT/comparison.md (ending with `footer`, e.g. how the runs were made) and
    OUT/comparison.png; returns (the Markdown table, the runs)."""
    md_path, png_path = check_outputs(out_dir, force)
    runs = load_runs(run_dirs, skip_bad=skip_bad, warn=warn)
    if not runs:
        raise RecordError(f"no readable run records among {', '.join(run_dirs)} (all were skipped).")
    os.makedirs(out_dir, exist_ok=True)
    plot_curves(runs, png_path)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(markdown_report(runs) + f"\n![eval curves]({os.path.basename(png_path)})\n"
                + (f"\n{footer}\n" if footer else ""))
    return markdown_table(runs), runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (0 done, 1 bad input or outputs in the way)."""
    parser = argparse.ArgumentParser(prog="python -m apphub_vit.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="RUN_DIR: a run's save_dir, a record JSON file or a folder of run folders.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, help="folder for comparison.md and comparison.png")
    parser.add_argument("--skip-bad", action="store_true", help="warn about and leave out unreadable records")
    parser.add_argument("--force", action="store_true", help="replace existing comparison.md / comparison.png")
    args = parser.parse_args(argv)
    try:
        table, runs = compare(args.run_dirs, args.out, skip_bad=args.skip_bad, force=args.force,
                              warn=lambda msg: print(msg, file=sys.stderr))
    except (RecordError, FileExistsError) as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 1
    print(table)
    print(f"\nWrote {os.path.join(args.out, OUTPUT_FILES[0])} and {os.path.join(args.out, OUTPUT_FILES[1])} "
          f"({len(runs)} runs).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
