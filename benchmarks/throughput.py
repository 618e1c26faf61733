"""Training throughput of the pretraining app, in one process on one machine, as a table with ratios.

    python benchmarks/throughput.py                    # full-size ViT (6 layers, dim 256, patch 4), this machine
    python benchmarks/throughput.py --size tiny        # a 2-layer dim-32 ViT: a smoke test for CI-sized machines
    python benchmarks/throughput.py --batch_size 512   # our path at another batch (the apphub's stays 128)

Rows (images per second; end-to-end rows are `Estimator.fit` on CIFAR-shaped synthetic data, training steps only:
eval is excluded and so are the first `--skip` steps of the timed epoch, where compilation and worker start-up land):

1. the apphub recipe end to end: post-norm ViT, SGD, fp32, batch 128, the six per-sample pipeline ops; and the same
   without our fix of FastEstimator's InfiniteSampler (`apphub_vit/compat.py`), which on current torch restarts and
   reshuffles the sampler at every batch: what the apphub app costs as FastEstimator 1.7.0 ships it;
2. our path end to end: the app's defaults for this machine (recipe "vit" at its batch of 256: AutoAugment and the
   six ops batched on the device, the conv stem + Locality Self-Attention; on a GPU bf16, torch.compile and each
   train step replayed as a CUDA graph; on a CPU fp32, no compile, no graph); then the same without the per-image
   policy (`augment="apphub"`), and as the plain ViT (patch stem, no LSA); on a GPU also without the CUDA graph;
3. the apphub pipeline alone (six per-sample ops, its batch), and ours (uint8 batching only, its batch);
4. the model's training step alone (forward, backward, optimizer step) at our path's settings, with our batched
   augmentation ops included, data already on the device;
5. the peer: the training loop a PyTorch user would write by hand for a ViT of the same size, timm's
   `VisionTransformer` (6 x 256, 8 heads, MLP 512, patch 4, CLS token), data on the device, random crop (reflect pad
   4) and flip on the device, label smoothing 0.1, fused AdamW, and on a GPU bf16 autocast and `torch.compile`
   (skipped, saying so, where timm is not installed: `pip install -e ".[bench]"`); on a GPU also the same loop with
   the model compiled as CUDA graphs (`torch.compile(mode="reduce-overhead")`), what such a user tries next when the
   step is launch-bound, as this one is at batch 256. The ratio of our path to the faster of the two is the one to
   quote.

`--only peer` measures our path end to end and the peer rows alone (a short call on a lent GPU), the ratios then
against our path.

Each row also gives its achieved TFLOP/s: the images/s times the FLOPs of one training image (forward and backward,
counted by torch's FlopCounterMode on that row's model; the optimizer and augmentation are not counted).
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import apphub_vit  # noqa: E402,F401  (FastEstimator compatibility fix)
from apphub_vit.compat import fastestimator_sampler_as_shipped  # noqa: E402
from fastestimator.trace import Trace  # noqa: E402

from apphub_vit import pretrain  # noqa: E402
from apphub_vit.recipes import VIT_RECIPES  # noqa: E402
from apphub_vit.vit_app import vit_book  # noqa: E402
from networks.vit import ViTModel  # noqa: E402

SIZES = {"full": dict(num_layers=6, em_dim=256, num_heads=8, ff_dim=512, patch_size=4),
         "tiny": dict(num_layers=2, em_dim=32, num_heads=2, ff_dim=64, patch_size=8)}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrainTimer(Trace):
    """Images/s over the training steps of the last epoch, from step `skip` on (eval excluded)."""
    def __init__(self, batch_size: int, skip: int, sync_debug: bool = False) -> None:
        super().__init__(mode="train")
        self.batch_size, self.skip, self.sync_debug = batch_size, skip, sync_debug and torch.cuda.is_available()
        self.start, self.steps, self.rate = None, 0, float("nan")

    def on_epoch_begin(self, data) -> None:
        self.start, self.steps = None, 0

    def on_batch_end(self, data) -> None:
        self.steps += 1
        if self.steps == self.skip:
            _sync()
            self.start = time.perf_counter()
            if self.sync_debug:  # warn (with the stack) at every op that waits for the GPU from here on
                torch.cuda.set_sync_debug_mode("warn")

    def on_epoch_end(self, data) -> None:
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode("default")
        _sync()
        if self.start is not None:
            self.rate = (self.steps - self.skip) * self.batch_size / (time.perf_counter() - self.start)


def end_to_end(kwargs: Dict, batch_size: int, steps: int, skip: int, epochs: int, profile: bool = False,
               sync_debug: bool = False) -> float:
    with tempfile.TemporaryDirectory() as save_dir:
        est = pretrain.get_estimator(dataset="synthetic", save_dir=save_dir, batch_size=batch_size, epochs=epochs,
                                     train_steps_per_epoch=steps, eval_steps_per_epoch=1, log_steps=0,
                                     synthetic_size=[(steps + 1) * batch_size, 1000], **kwargs)
        timer = TrainTimer(batch_size, skip, sync_debug)
        est.system.traces.append(timer)
        if not profile:
            est.fit(warmup=False)
            return timer.rate
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(est.fit, warmup=False)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return timer.rate


def pipeline_alone(kwargs: Dict, batch_size: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as save_dir:
        est = pretrain.get_estimator(dataset="synthetic", save_dir=save_dir, batch_size=batch_size, epochs=1,
                                     synthetic_size=[(steps + 6) * batch_size, 1000], **kwargs)
        with est.pipeline(mode="train", epoch=1, steps_per_epoch=steps + 5) as loader:
            it = iter(loader)
            for _ in range(5):  # worker start-up
                next(it)
            start = time.perf_counter()
            for _ in range(steps):
                next(it)
            return steps * batch_size / (time.perf_counter() - start)


def model_step_alone(kwargs: Dict, batch_size: int, steps: int, skip: int) -> float:
    """Our network's ops (batched augmentation, model, loss, update) on a batch already on the device."""
    with tempfile.TemporaryDirectory() as save_dir:
        est = pretrain.get_estimator(dataset="synthetic", save_dir=save_dir, batch_size=batch_size, epochs=1,
                                     synthetic_size=[10000, 1000], **kwargs)
    network = est.network
    device = network.device
    batch = {"x": torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8, device=device),
             "y": torch.randint(0, 100, (batch_size, ), dtype=torch.uint8, device=device)}
    with network(mode="train", epoch=1, ds_id=""):
        for i in range(skip + steps):
            if i == skip:
                _sync()
                start = time.perf_counter()
            network.run_step(dict(batch))
        _sync()
    return steps * batch_size / (time.perf_counter() - start)


def train_flops_per_image(model: torch.nn.Module, batch: int = 2, backward: bool = True) -> float:
    """FLOPs of one image's forward (and backward) pass through `model`, counted by FlopCounterMode (matmuls,
    convolutions) on the CPU with attention run as plain matmuls (the counter has no formula for the CPU's fused
    attention kernel); a model that returns more than its logits in training (recipe `vit`'s distillation head's
    logits, its relative-localization loss, its guided tokens) has those heads counted too. The model is left as it
    was."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = model.cpu().train()
    x = torch.randn(batch, 3, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x)
        # (logits[, distillation logits][, drloc's loss][, guided tokens])
        outputs = out if isinstance(out, tuple) else (out, )
        if backward:  # a loss that reaches every head: the logits' log-sum-exp, an auxiliary loss as it is, the guided
            # tokens' mean square (as their loss against the teacher's map, which costs no matmul)
            sum(o.float().logsumexp(dim=1).sum() if o.dim() == 2 else o.float().square().mean() if o.dim() == 3 else o
                for o in outputs).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def vit_flops(kwargs: Dict) -> float:
    """`train_flops_per_image` of the ViT an end-to-end row trains: the recipe's model with the row's overrides,
    resolved as the app resolves them (`distill=0` also drops the recipe's distillation head and guidance)."""
    book, name = vit_book("pretrain"), kwargs.get("recipe", "vit")
    fields = book.recipes[name].field_values()
    recipe, _ = book.resolve(name, {k: v for k, v in kwargs.items() if k in fields})
    return train_flops_per_image(ViTModel.from_config(100, recipe.model))


def timm_vit(arch: Dict):
    """timm's VisionTransformer of our size (None where timm is not installed)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    return VisionTransformer(img_size=32, patch_size=arch["patch_size"], num_classes=100, embed_dim=arch["em_dim"],
                             depth=arch["num_layers"], num_heads=arch["num_heads"],
                             mlp_ratio=arch["ff_dim"] / arch["em_dim"], class_token=True, global_pool="token")


def timm_loop(model: torch.nn.Module, batch_size: int, steps: int, skip: int, graphs: bool = False) -> float:
    """The hand-written loop of row 5 training `model` (`timm_vit`): images/s over `steps` steps after `skip` untimed
    ones. graphs: compile the model with mode="reduce-overhead" (its forward and backward replayed as CUDA graphs by
    torch.compile's cudagraph trees; GPU only)."""
    import torch.nn.functional as F
    gpu = torch.cuda.is_available()
    if graphs and not gpu:
        raise ValueError("timm_loop(graphs=True) replays CUDA graphs: it needs a GPU")
    device = torch.device("cuda" if gpu else "cpu")
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=gpu)
    forward = torch.compile(model, mode="reduce-overhead" if graphs else None) if gpu else model
    images = torch.randint(0, 256, (50000 if gpu else 4 * batch_size, 32, 32, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (len(images), ), device=device)
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(1, 3, 1, 1)
    rows = torch.arange(32, device=device)

    def step(index: torch.Tensor) -> None:
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs may be overwritten now
        x = (images[index].permute(0, 3, 1, 2).float() / 255 - mean) / std  # [B, 3, 32, 32]
        x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)
        x = F.pad(x, (4, 4, 4, 4), mode="reflect")  # [B, 3, 40, 40]
        dy, dx = torch.randint(0, 9, (2, len(x), 1), device=device)
        x = x[torch.arange(len(x), device=device)[:, None, None, None], torch.arange(3, device=device)[None, :, None,
              None], (dy + rows)[:, None, :, None], (dx + rows)[:, None, None, :]]  # a 32 x 32 crop per image
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = F.cross_entropy(forward(x), labels[index], label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    order = torch.randperm(len(images), device=device)
    for i in range(skip + steps):
        if i == skip:
            _sync()
            start = time.perf_counter()
        first = (i * batch_size) % (len(images) - batch_size)
        step(order[first:first + batch_size])
    _sync()
    return steps * batch_size / (time.perf_counter() - start)


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="our path's batch (default: the recipe's, 256); the apphub's stays 128")
    parser.add_argument("--skip", type=int, default=None, help="untimed steps before timing (compile, start-up)")
    parser.add_argument("--profile", action="store_true", help="cProfile our end-to-end run (host time per function)")
    parser.add_argument("--sync_debug", action="store_true", help="report every host-device sync in our timed steps")
    parser.add_argument("--only", choices=("all", "peer"), default="all",
                        help="peer: our path end to end and the peer rows only, the ratios against our path")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    steps = args.steps or (300 if gpu else 10)
    skip = args.skip if args.skip is not None else (30 if gpu else 3)
    arch = SIZES[args.size]
    apphub = dict(recipe="apphub", device_augment=False, precision="fp32", compile=False, **arch)
    # the app's defaults for this machine, but the ViT alone, as the peer's loop: without recipe "vit"'s distillation
    # teacher (trained before the fit, then a forward pass in every step; time_to_accuracy.py counts both)
    ours = dict(distill=0, **arch)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch_size must be a positive number of images, got {args.batch_size}")
    ours_batch = args.batch_size or VIT_RECIPES["vit"].batch_size
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; model: {args.size} {arch}; torch {torch.__version__}")

    def apphub_as_shipped() -> float:
        with fastestimator_sampler_as_shipped():
            return end_to_end(apphub, 128, steps, skip, epochs=1)

    plain = dict(ours, stem="patch", spt=False, lsa=False)  # the plain ViT: one patch Conv2d, plain attention
    ours_flops, plain_flops = vit_flops(ours), vit_flops(plain)
    apphub_flops = vit_flops(apphub)
    peer = timm_vit(arch)
    peer_name = (f"peer: hand-written timm ViT loop, same size (batch {ours_batch}"
                 f"{', bf16, torch.compile' if gpu else ', fp32'})")
    ours_row = (f"our path, end to end (batch {ours_batch}, app defaults for this device)",
                lambda: end_to_end(ours, ours_batch, steps, skip, epochs=2 if gpu else 1, profile=args.profile,
                                   sync_debug=args.sync_debug), ours_flops)
    peer_rows = [] if peer is None else [
        (peer_name, lambda: timm_loop(peer, ours_batch, steps, skip), train_flops_per_image(peer)),
        *([(f"peer as CUDA graphs: the same loop, torch.compile(mode=\"reduce-overhead\") (batch {ours_batch})",
            lambda: timm_loop(peer, ours_batch, steps, skip, graphs=True), train_flops_per_image(peer))]
          if gpu else []),
    ]
    # (name, measure, FLOPs per training image or None for rows without a model)
    measurements = [ours_row, *peer_rows] if args.only == "peer" else [
        ("apphub recipe, end to end (batch 128, fp32, per-sample ops)",
         lambda: end_to_end(apphub, 128, steps, skip, epochs=1), apphub_flops),
        ("the same without our FastEstimator sampler fix (as FastEstimator 1.7.0 runs it on this torch)",
         apphub_as_shipped, apphub_flops),
        ours_row,
        *([(f"our path without the CUDA graph step, end to end (batch {ours_batch})",
            lambda: end_to_end(dict(ours, cuda_graph=False), ours_batch, steps, skip, epochs=2), ours_flops)]
          if gpu else []),
        (f"our path without the per-image policy (--augment apphub), end to end (batch {ours_batch})",
         lambda: end_to_end(dict(ours, augment="apphub"), ours_batch, steps, skip, epochs=2 if gpu else 1),
         ours_flops),
        # CCT's conv stem + Locality Self-Attention (Hassani et al. 2021, Lee et al. 2021), on in the default recipe
        # for their accuracy on CIFAR-10 (docs/results-cifar10.md); this row weighs what they cost in speed.
        (f"our path as the plain ViT (--stem patch --lsa False), end to end (batch {ours_batch})",
         lambda: end_to_end(plain, ours_batch, steps, skip, epochs=2 if gpu else 1), plain_flops),
        ("apphub pipeline alone (six per-sample ops, batch 128)", lambda: pipeline_alone(apphub, 128, steps), None),
        (f"our pipeline alone (uint8 batches gathered on the device, batch {ours_batch})",
         lambda: pipeline_alone(ours, ours_batch, steps), None),
        (f"our model step alone (augment + fwd + bwd + update, batch {ours_batch})",
         lambda: model_step_alone(ours, ours_batch, steps, skip), ours_flops),
        *peer_rows,
    ]
    # what the ratio line calls each peer row, and the images/s of those that ran
    peer_labels = dict(zip([name for name, _, _ in peer_rows],
                           ["the hand-written timm loop", "its CUDA-graph variant"]))
    rows, peer_rates = [], {}
    for name, measure, flops in measurements:
        is_peer = name in peer_labels
        try:
            rate = measure()
        except Exception as err:  # a peer variant that fails on this machine is reported, not fatal
            if not is_peer:
                raise
            print(f"peer row failed: {name}: {type(err).__name__}: {str(err).splitlines()[0][:300]}", flush=True)
            continue
        rows.append((name, rate, flops))
        if is_peer:
            peer_rates[name] = rate
        print(f"MEASURED {name}: {rate:,.0f} images/s", flush=True)  # at once, in case a later row fails
    if peer is None:
        print("peer row skipped: timm is not installed (pip install -e \".[bench]\")")
    base = rows[0][1]
    ours_rate = next(rate for name, rate, _ in rows if name == ours_row[0])
    width = max(len(name) for name, _, _ in rows)
    rw = max(8, *(len(f"{rate:,.0f}") for _, rate, _ in rows))  # the pipeline rows run to millions on a GPU
    print(f"\nFLOPs per training image (forward + backward): ours {ours_flops / 1e9:.3f} G, the plain ViT "
          f"{plain_flops / 1e9:.3f} G" + (f", the timm peer {peer_rows[0][2] / 1e9:.3f} G" if peer_rows else ""))
    versus = "vs our path end to end" if args.only == "peer" else "vs apphub end to end"
    print(f"\n| {'what'.ljust(width)} | {'images/s'.rjust(rw)} | {versus} | TFLOP/s |")
    print(f"| {'-' * width} | {'-' * (rw - 1)}: | {'-' * (len(versus) - 1)}: | ------: |")
    for name, rate, flops in rows:
        tflops = f"{rate * flops / 1e12:7.2f}" if flops else "      -"
        print(f"| {name.ljust(width)} | {rate:{rw},.0f} | {rate / base:{len(versus) - 1}.2f}x | {tflops} |")
    if peer_rates:
        ratios = [f"/ {peer_labels[name]}: {ours_rate / rate:.2f}x" for name, rate in peer_rates.items()]
        print(f"\nour path end to end {'; '.join(ratios)}; / the faster peer: "
              f"{ours_rate / max(peer_rates.values()):.2f}x")


if __name__ == "__main__":
    main()
