"""Where an epoch's time goes: the app's own Estimator, with each phase of FastEstimator's epoch loop timed.

    python benchmarks/epoch_profile.py --data_dir /tmp/c10 --epochs 4      # recipe "vit" on CIFAR-10, 4 epochs
    python benchmarks/epoch_profile.py --data_dir /tmp/c10 --epochs 4 --torch_profiler   # and torch's op table
    python benchmarks/epoch_profile.py --budget tiny                       # CPU smoke test on generated data

Every other option goes to the app (`apphub_vit/finetune.py`'s `get_estimator`, parsed as FastEstimator's command
line parses it; `--from_scratch True` is implied). Printed per mode (train, eval): the epoch's total and its parts,
for the first epoch alone (warm-up leftovers, the CUDA-graph capture) and as the mean over the later ones: the
network's steps (`run_step`: the ops, forward, backward, update), each trace's hooks (FastEstimator's own Logger and
Essentials among them), the network's and the pipeline's epoch context (entering and leaving: FastEstimator's model
moves), the garbage collector's calls (the pipeline's after every epoch, `AppEstimator`'s collection and freeze) and
the rest (the loop itself, the loader's batches). Each region's time excludes the regions timed inside it. On a GPU
every timed region ends with `torch.cuda.synchronize()`, so GPU work counts in the region that queued it; that makes
the steps wait for each other, so the parts are an attribution of the time, not the run's speed
(benchmarks/time_to_accuracy.py and benchmarks/throughput.py measure that). With --torch_profiler the last
train epoch and the last eval epoch each run under `torch.profiler`: printed for each, its wall time, the GPU kernels'
summed time (the share of the wall time the GPU was busy), that time by kind of kernel (attention, convolution,
matrix product, the other Triton kernels, the rest: told apart by their names) and the top operators.
Measured: docs/performance.md.
"""
import argparse
import contextlib
import functools
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import apphub_vit  # noqa: E402,F401  (FastEstimator compatibility fixes)
import torch  # noqa: E402
from fastestimator.schedule.schedule import get_current_items  # noqa: E402
from fastestimator.trace import Trace  # noqa: E402
from fastestimator.util.cli_util import parse_cli_to_dictionary  # noqa: E402

from apphub_vit import finetune  # noqa: E402

TINY = dict(dataset="synthetic", synthetic_size=[64, 32], batch_size=16, num_layers=1, em_dim=16, num_heads=2,
            ff_dim=32, patch_size=8, augment="apphub", teacher_epochs=1)  # recipe "vit"'s teacher, 1 epoch
STEP = "network steps (run_step)"
NETWORK_CONTEXT = "network epoch context (enter + exit)"
PIPELINE_CONTEXT = "pipeline epoch context (enter + exit)"
TOTAL = "epoch total"
GC = "gc.collect / gc.freeze"
REST = "rest (the loop, the loader's batches)"
HOOKS = ("on_epoch_begin", "on_batch_begin", "on_batch_end", "on_epoch_end")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class EpochProfile:
    """Seconds per (epoch index, mode, region), filled by the timers `instrument` puts around an Estimator's parts."""
    def __init__(self) -> None:
        self.seconds: Dict[tuple, float] = defaultdict(float)
        self.calls: Dict[tuple, int] = defaultdict(int)
        self.epochs: List[tuple] = []  # (epoch index, mode), in the order they ran
        self.current: Optional[tuple] = None
        self._inner: List[float] = []  # per open region, the seconds of the regions opened inside it

    def add(self, region: str, seconds: float) -> None:
        if self.current is not None:
            self.seconds[(*self.current, region)] += seconds
            self.calls[(*self.current, region)] += 1

    def timed(self, region: str, fn: Callable) -> Callable:
        """`fn` timed as `region`, exclusive of the timed regions inside it (a gc.collect in a context's exit counts
        as gc.collect, not twice)."""
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            _sync()
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                _sync()
                elapsed, inner = time.perf_counter() - start, self._inner.pop()
                self.add(region, elapsed - inner)
                if self._inner:
                    self._inner[-1] += elapsed
        return wrapper


def _timed_context(profile: EpochProfile, obj: Any, region: str) -> None:
    """Time `obj`'s `__call__` + `__enter__` + `__exit__` (looked up on the class, so a subclass takes its place)."""
    cls = type(obj)
    obj.__class__ = type(f"Timed{cls.__name__}", (cls, ), {
        "__call__": profile.timed(region, cls.__call__),
        "__enter__": profile.timed(region, cls.__enter__),
        "__exit__": profile.timed(region, cls.__exit__)})


def instrument(estimator: Any) -> EpochProfile:
    """Put timers around `estimator`'s epochs, network steps, traces' hooks and epoch contexts; returns the profile."""
    profile = EpochProfile()
    run_epoch = estimator._run_epoch

    def epoch(eager: bool) -> None:
        profile.current = (estimator.system.epoch_idx, estimator.system.mode)
        profile.epochs.append(profile.current)
        _sync()
        start = time.perf_counter()
        run_epoch(eager)
        _sync()
        profile.add(TOTAL, time.perf_counter() - start)
        profile.current = None
    estimator._run_epoch = epoch  # the instance's attribute: FastEstimator's loop calls self._run_epoch
    estimator.network.run_step = profile.timed(STEP, estimator.network.run_step)
    _timed_context(profile, estimator.network, NETWORK_CONTEXT)
    _timed_context(profile, estimator.pipeline, PIPELINE_CONTEXT)
    prepare = estimator._prepare_traces

    def prepare_traces(run_modes: Any) -> None:  # fit() adds FastEstimator's own traces (Logger, the Essentials) here
        prepare(run_modes)
        # a scheduled trace (an EpochScheduler of metrics: recipe vit's TTA metrics in the last epoch) by its values
        for trace in filter(None, get_current_items(estimator.traces_in_use)):
            name = f"trace {type(trace).__name__}"
            for hook in HOOKS:
                setattr(trace, hook, profile.timed(name, getattr(trace, hook)))
    estimator._prepare_traces = prepare_traces
    return profile


@contextlib.contextmanager
def timed_gc(profile: EpochProfile) -> Iterator[None]:
    """`gc.collect` and `gc.freeze` timed as regions of their own while the block runs (FastEstimator's pipeline and
    the AppEstimator call them by attribute, so the module's functions are swapped)."""
    collect, freeze = gc.collect, gc.freeze
    gc.collect, gc.freeze = profile.timed(GC, collect), profile.timed(GC, freeze)
    try:
        yield
    finally:
        gc.collect, gc.freeze = collect, freeze


def summarize(profile: EpochProfile) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{mode: {region: {"first": seconds in the mode's first epoch, "later": mean seconds over the later epochs
    (None with one epoch), "calls": calls per later epoch (first epoch's with one)}}}, regions by later time."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for mode in ("train", "eval"):
        epochs = [e for e in profile.epochs if e[1] == mode]
        if not epochs:
            continue
        regions = {key[2] for key in profile.seconds if key[1] == mode}
        later = epochs[1:]
        table: Dict[str, Dict[str, float]] = {}
        for region in regions | {REST}:
            def seconds(epoch: tuple, region: str = region) -> float:
                if region == REST:
                    return profile.seconds[(*epoch, TOTAL)] - sum(
                        profile.seconds[(*epoch, r)] for r in regions if r != TOTAL)
                return profile.seconds[(*epoch, region)]
            table[region] = {
                "first": seconds(epochs[0]),
                "later": sum(seconds(e) for e in later) / len(later) if later else None,
                "calls": (sum(profile.calls[(*e, region)] for e in later) / len(later) if later
                          else profile.calls[(*epochs[0], region)]) if region != REST else None}
        key = "later" if later else "first"
        out[mode] = dict(sorted(table.items(), key=lambda kv: (kv[0] != TOTAL, -(kv[1][key] or 0.0))))
    return out


def report(summary: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    lines = []
    for mode, table in summary.items():
        lines += [f"\n{mode} epochs", "| region | first epoch (s) | later epochs, mean (s) | share of a later epoch | "
                  "calls per epoch | per call (ms) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        total = table[TOTAL]["later"] or table[TOTAL]["first"]
        for region, row in table.items():
            value = row["later"] if row["later"] is not None else row["first"]
            later = "-" if row["later"] is None else f"{row['later']:.4f}"
            calls = "-" if row["calls"] is None else f"{row['calls']:g}"
            per_call = "-" if not row["calls"] else f"{1000 * value / row['calls']:.2f}"
            lines.append(f"| {region} | {row['first']:.4f} | {later} | {value / total:.1%} | {calls} | {per_call} |")
    return "\n".join(lines)


def device_events(events: Sequence[Any]) -> List[Any]:
    """The GPU's own events (kernels, copies) among a profile's averages: a CPU op also carries its kernels' time, and
    so does a user's annotation, so counting them too would count every kernel twice."""
    return [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation]


def device_seconds(events: Sequence[Any]) -> float:
    """Seconds of `device_events`, as torch's table totals them."""
    return sum(e.self_device_time_total for e in device_events(events)) / 1e6


# Kinds of GPU kernel, told apart by name, the first match winning: cuDNN names its attention kernels
# "...sdpa...flash_fprop...", so attention is looked for before the convolutions' "fprop" / "dgrad" / "wgrad".
KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attention", "cudnn::fusion")),
                ("convolution", ("conv", "fprop", "dgrad", "wgrad")),
                ("matrix product", ("gemm", "nvjet", "cutlass", "xmma", "splitkreduce")),
                ("other Triton", ("triton", )))


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")


def kernel_kinds(events: Sequence[Any]) -> Dict[str, float]:
    """Seconds of `device_events` by `kernel_kind`, largest first."""
    kinds: Dict[str, float] = defaultdict(float)
    for e in device_events(events):
        kinds[kernel_kind(e.key)] += e.self_device_time_total / 1e6
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


def profiler_report(mode: str, prof: torch.profiler.profile, wall: float, rows: int = 25) -> str:
    """One profiled epoch: its wall time, the GPU kernels' summed time (how busy the GPU was: a share far below 100%
    says the epoch waits on the host) and the top operators by GPU time (CPU time on a CPU)."""
    events = prof.key_averages()
    cuda = torch.cuda.is_available()
    lines = [f"\n{mode} epoch under torch.profiler: wall {wall:.4f} s"]
    if cuda:
        kernels = device_seconds(events)
        lines[0] += f", GPU kernels {kernels:.4f} s ({kernels / wall:.0%} of the wall time)"
        lines += [f"  {kind:15s} {seconds:.4f} s ({seconds / max(kernels, 1e-12):.0%} of the kernels' time)"
                  for kind, seconds in kernel_kinds(events).items()]
    lines.append(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=rows))
    return "\n".join(lines)


class TorchProfiler(Trace):
    """torch.profiler around the last train epoch and, separately, the last eval epoch; each is printed when it ends.
    `instrument`'s synchronizes run inside them too, so the GPU's busy share is that of the timed run (a lower bound
    for an untimed one)."""
    def __init__(self, epoch: int) -> None:
        super().__init__(mode=["train", "eval"])
        self.epoch = epoch
        self.prof: Optional[torch.profiler.profile] = None
        self.start = 0.0

    def on_epoch_begin(self, data: Any) -> None:
        if self.system.epoch_idx == self.epoch:
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = torch.profiler.profile(activities=activities)
            _sync()
            self.prof.__enter__()
            self.start = time.perf_counter()

    def on_epoch_end(self, data: Any) -> None:
        if self.prof is not None:
            _sync()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            print(profiler_report(self.system.mode, self.prof, wall), flush=True)
            self.prof = None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="a local CIFAR-10 folder (cifar-10-batches-py or its parent)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs to run and time (default 4; at least 2, so "
                                                              "that later epochs are told apart from the first)")
    parser.add_argument("--budget", choices=("full", "tiny"), default="full",
                        help="full: the app on --data_dir; tiny: generated data, a 1-layer ViT (smoke test)")
    parser.add_argument("--torch_profiler", action="store_true",
                        help="also run the last train epoch and the last eval epoch under torch.profiler and print, "
                             "for each, the GPU's busy share and the top ops")
    parser.add_argument("--save_dir", default=None, help="the run's folder (default: a new temporary folder)")
    args, app_args = parser.parse_known_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be at least 2 (the first epoch is reported apart), got {args.epochs}")
    options = parse_cli_to_dictionary(app_args)
    if args.budget == "tiny":
        options = {**TINY, **options}
    elif args.data_dir is None:
        parser.error("--data_dir is needed: a local CIFAR-10 folder (python ../shared/data/cifar10/to_batches.py "
                     "/tmp/c10 writes one); or --budget tiny for a smoke test on generated data")
    else:
        options["data_dir"] = os.path.abspath(args.data_dir)
    save_dir = args.save_dir or tempfile.mkdtemp(prefix="epoch_profile-")
    estimator = finetune.get_estimator(from_scratch=True, epochs=args.epochs, save_dir=save_dir, **options)
    profile = instrument(estimator)
    if args.torch_profiler:
        estimator.traces.append(TorchProfiler(args.epochs))
    with timed_gc(profile):
        estimator.fit()
    summary = summarize(profile)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\nwhere an epoch's time goes: {args.epochs} epochs, device {device}; on a GPU each region ends with a "
          f"synchronize (an attribution, not the run's speed); run in {save_dir}")
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
