"""Locality Self-Attention's kernels: the default model's speed with each way of running its masked attention.

    python benchmarks/attention.py                     # on a GPU: every kernel, train step at 256, eval at 10,000
    python benchmarks/attention.py --budget tiny       # CPU smoke test: a 1-layer model, a few steps

LSA (Lee et al. 2021) hides the diagonal of every attention matrix. Scaled-dot-product attention with a boolean mask
cannot use the flash kernel; FlexAttention (Dong et al. 2024) compiles the mask into a fused Triton kernel
(`networks.vit.lsa_attention`; the apps take it for eval passes on a GPU, and SDPA for training steps, because a
training step captured as a CUDA graph with FlexAttention trained wrongly: docs/performance.md). For each kernel
(`networks.vit.lsa_kernel`, set for every pass here), this prints, in one process:

* the model's training step alone, as the apps run it (`throughput.model_step_alone`: the batched augmentation, the
  compiled bf16 forward, backward and fused AdamW, replayed as a CUDA graph on a GPU; the data already on the device;
  recipe "vit" without its distillation teacher, whose forward pass would dilute the difference);
* the compiled model's eval forward pass (no gradient, bf16 autocast) at the apps' GPU eval batch;
* how far its outputs and gradients are from the SDPA kernel's (relative to their norms), same weights and batch;
* and, as the bound for any mask, the same model without LSA (`lsa=False`: unmasked attention, the flash kernel).

On a CPU FlexAttention has no backward, so the tiny budget measures SDPA and the bound only.
Measured: docs/performance.md.
"""
import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import apphub_vit  # noqa: E402,F401  (FastEstimator compatibility fixes)
from throughput import model_step_alone  # noqa: E402

from apphub_vit.hardware import GPU_EVAL_BATCH  # noqa: E402
from apphub_vit.recipes import VIT_RECIPES  # noqa: E402
from networks import vit  # noqa: E402
from networks.vit import ViTModel  # noqa: E402

TINY = dict(num_layers=1, em_dim=32, num_heads=2, ff_dim=64)


def eval_forward(model_kwargs: Dict, batch: int, steps: int, gpu: bool) -> float:
    """Images/s of the compiled model's eval forward (no gradient; bf16 autocast on a GPU) on a batch on the device."""
    model = ViTModel.from_config(10, replace(VIT_RECIPES["vit"].model, **model_kwargs)).eval()
    device = "cuda" if gpu else "cpu"
    model = model.to(device, memory_format=torch.channels_last)
    if gpu:
        model.compile()
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
        for i in range(3 + steps):
            if i == 3:  # after compilation
                _sync(gpu)
                start = time.perf_counter()
            model(x)
        _sync(gpu)
    return steps * batch / (time.perf_counter() - start)


def difference_from_sdpa(model_kwargs: Dict, kernel: str, gpu: bool) -> Tuple[float, float]:
    """How far `kernel` is from SDPA on the same weights and batch (the model compiled on a GPU, bf16 autocast):
    |output - SDPA's| / |SDPA's output| and the largest such ratio of a parameter's gradient (norms: a gradient's
    entries are small, so their absolute differences say little)."""
    torch.manual_seed(0)
    device = "cuda" if gpu else "cpu"
    base = ViTModel.from_config(10, replace(VIT_RECIPES["vit"].model, **model_kwargs)).to(device)
    x = torch.randn(64, 3, 32, 32, device=device)
    results = []
    for name in ("sdpa", kernel):
        vit.lsa_kernel = name
        torch._dynamo.reset()
        model = ViTModel.from_config(10, base.config).to(device)
        model.load_state_dict(base.state_dict())
        if gpu:
            model.compile()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
            out = model(x).float()
        out.logsumexp(1).mean().backward()
        results.append((out.detach(), [p.grad.float() for p in model.parameters()]))
    (out_a, grads_a), (out_b, grads_b) = results

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((b - a).norm() / a.norm().clamp_min(1e-12)).item()

    return relative(out_a, out_b), max(relative(a, b) for a, b in zip(grads_a, grads_b))


def _sync(gpu: bool) -> None:
    if gpu:
        torch.cuda.synchronize()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=("full", "tiny"), default="full")
    parser.add_argument("--kernels", default=None, help="comma-separated, of sdpa,flex (default: both on a GPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    kernels = (args.kernels or ("sdpa,flex" if gpu else "sdpa")).split(",")
    for kernel in kernels:
        if kernel not in ("sdpa", "flex"):
            parser.error(f"--kernels takes sdpa and flex, got {kernel!r}")
    if "flex" in kernels and not gpu:
        parser.error("--kernels flex needs a GPU: FlexAttention has no backward on a CPU")
    tiny = args.budget == "tiny"
    arch = TINY if tiny else {}
    steps = args.steps or (3 if tiny else 200)
    skip = 2 if tiny else 30
    batch, eval_batch = (16, 32) if tiny else (VIT_RECIPES["vit"].batch_size, GPU_EVAL_BATCH)
    app = dict(distill=0, **arch)
    if tiny:
        app.update(compile=False, cuda_graph=False)
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; model: recipe vit {arch or '(6 x 256)'}")
    rows = []
    unmasked = ("no LSA (the same model unmasked: the bound)", "sdpa", dict(lsa=False))
    variants = [(f"LSA, {kernel}", kernel, {}) for kernel in kernels] + [unmasked]
    setting = vit.lsa_kernel
    try:
        for name, kernel, change in variants:
            vit.lsa_kernel = kernel
            torch._dynamo.reset()
            step = model_step_alone(dict(app, **change), batch, steps, skip)
            torch._dynamo.reset()
            forward = eval_forward(dict(arch, **change), eval_batch, max(steps // 20, 2), gpu)
            diff = difference_from_sdpa(arch, kernel, gpu) if kernel != "sdpa" and not change else None
            rows.append((name, step, forward, diff))
            print(f"MEASURED {name}: train step {step:,.0f} images/s, eval forward {forward:,.0f} images/s",
                  flush=True)
    finally:
        vit.lsa_kernel = setting
    base_step, base_forward = rows[0][1], rows[0][2]
    print(f"\n| attention | train step alone, batch {batch} (img/s) | vs {rows[0][0]} | eval forward, batch "
          f"{eval_batch} (img/s) | vs {rows[0][0]} | relative difference from SDPA: output / worst gradient |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, step, forward, diff in rows:
        diffs = "-" if diff is None else f"{diff[0]:.1e} / {diff[1]:.1e}"
        print(f"| {name} | {step:,.0f} | {step / base_step:.2f}x | {forward:,.0f} | {forward / base_forward:.2f}x | "
              f"{diffs} |")
    if "flex" in kernels:
        print("\nThe flex row's training step is only timed: captured as a CUDA graph it trains wrongly "
              "(docs/performance.md), so the apps train with SDPA and evaluate with FlexAttention.")


if __name__ == "__main__":
    main()
