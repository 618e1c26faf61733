"""A reference point for a ViT on the CIFAR-10 data itself: Lee, Lee & Song's plain-ViT recipe, trained on our copy.

    pip install -e ".[bench]"                                      # timm (torchvision comes with the project)
    python ../shared/data/cifar10/to_batches.py /tmp/c10           # once: the JPEG copy as cifar-10-batches-py
    python benchmarks/lee_reference.py --data_dir /tmp/c10 --cudagraphs --workers 15   # 100 epochs, eval after each

Follows S. H. Lee, S. Lee, B. C. Song, "Vision Transformer for Small-Size Datasets", arXiv 2112.13492 (2021; code:
github.com/aanna0701/SPT_LSA_ViT), whose plain ViT (no SPT, no LSA) reaches 93.58% on the original CIFAR-10, written
here from the paper's description of its training set-up:

- model: a ViT of depth 9, width 192, 12 heads (head dimension 16), MLP ratio 2, 4x4 patches on 32x32 images, a
  class token read by the head, stochastic depth 0.1; built with timm's `VisionTransformer` (2.70M parameters in timm;
  the paper's table says 2.8M for its own implementation);
- per-image augmentation (torchvision): random crop 32 with 4 pixels of padding, horizontal flip, AutoAugment's
  CIFAR-10 policy, normalisation with the CIFAR mean / std, random erasing with probability 0.25;
- per-batch mixing: with probability 0.5, CutMix (alpha 1.0) or MixUp (alpha 0.8), one of them at random, as DeiT,
  giving soft targets;
- "repeated augmentation x3" as the authors' code does it (`EpochSampler`): an epoch is three passes over the
  training images, each a new permutation with new augmentations, so 100 epochs are 300 passes (15M images); the
  warmup and the cosine are counted in these epochs;
- AdamW, learning rate 1e-3, weight decay 0.05 (on every parameter, as the authors' code), batch 128 (the last
  partial batch dropped), 10 epochs of linear warmup then a cosine to 0, per step; label smoothing 0.1 (applied to the
  mixed soft targets too); 100 epochs; the 10,000 test images evaluated after every epoch.

Known differences from the authors' code's defaults (this script keeps DeiT's settings instead): it mixes with
alpha 1.0 for MixUp as well; its random erasing covers up to 40% of the image and fills it with the CIFAR mean values,
where torchvision's covers up to 33% and fills it with 0 (the mean, after normalisation); it flips before cropping.

Why it is here: the only CIFAR-10 on these machines (`../shared/data/cifar10`) is a JPEG export at quality 75, while
Lee et al.'s figure was measured on the lossless originals. On this copy David Page's ResNet-9 recipe lost 3.0 points
(benchmarks/resnet9_reference.py: 90.99% / 91.07% against 94.06%). This recipe's figure on the JPEG copy, not the
93.58%, is therefore the one the project's ViT recipe has to beat. Like resnet9_reference.py it is plain PyTorch on
purpose and shares no code with the apps' pipelines or network beyond the CIFAR reader and mean / std.

Its 100 epochs are 15M training images, a long run: use `--cudagraphs` (a step of this small model at batch 128 is
launch-bound, and CUDA graphs replay it several times faster) and as many `--workers` as the CPU has cores less one,
as the per-image AutoAugment in the loader is then the limit. Results and times: docs/results-cifar10.md.

On a GPU it runs in bf16 autocast (optionally `--compile`d, or as CUDA graphs); on a CPU in fp32. The per-image
torchvision transforms run in `--workers` DataLoader processes, the last three of them for a whole batch
(`finish_batch`: the same images). `--epochs`, `--train_steps`, `--eval_images`, `--width` and `--depth` are for
smoke tests.
"""
import argparse
import csv
import itertools
import math
import os
import random
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from apphub_vit.data import find_cifar_folder, read_cifar_folder  # noqa: E402
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD  # noqa: E402

PUBLISHED = 93.58  # Lee, Lee & Song 2021: their plain ViT (no SPT / LSA) on the original CIFAR-10
NUM_CLASSES = 10
HEAD_DIM = 16  # the paper's 192 / 12 heads; --width keeps it, so a smoke-test width of 32 has 2 heads
INSTALL_HINT = 'pip install -e ".[bench]"  (or: pip install timm)'


def build_model(width: int = 192, depth: int = 9, drop_path: float = 0.1) -> nn.Module:
    """The paper's ViT for CIFAR (width 192, depth 9, 12 heads) as timm's VisionTransformer; exits without timm."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:
        raise SystemExit(f"lee_reference.py needs timm for its ViT, which is not installed ({err}). "
                         f"Install it with: {INSTALL_HINT}") from err
    if width % HEAD_DIM:
        raise SystemExit(f"--width must be a multiple of {HEAD_DIM} (the paper's head dimension), got {width}")
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=depth, num_heads=width // HEAD_DIM,
                             mlp_ratio=2, class_token=True, global_pool="token", drop_path_rate=drop_path,
                             num_classes=NUM_CLASSES)


ERASE_P = 0.25  # random erasing's probability per image (torchvision's scale and ratio)


def train_transform():
    """The per-image augmentation, on a PIL image: crop, flip, AutoAugment (CIFAR-10 policy), tensor, normalise,
    random erasing (after normalisation, so the erased pixels are 0, the mean). `CifarTrain` runs the same transforms
    split in two (`finish_batch`); this list is written out on its own, not from `pil_transform`, so that the test of
    the split against it also checks `pil_transform`."""
    from torchvision import transforms as T
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                      T.AutoAugment(T.AutoAugmentPolicy.CIFAR10), T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD),
                      T.RandomErasing(p=ERASE_P)])


def pil_transform():
    """The PIL part of `train_transform`: crop, flip, AutoAugment."""
    from torchvision import transforms as T
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(),
                      T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)])


def erase_box(image: torch.Tensor, eraser) -> torch.Tensor:
    """A torchvision `RandomErasing`'s draw for one [C, H, W] image, drawing torch's random numbers as its forward
    does: the box [top, left, height, width] it would fill with 0, or an empty box where it erases nothing."""
    if torch.rand(1) < eraser.p:
        top, left, h, w, value = eraser.get_params(image, scale=eraser.scale, ratio=eraser.ratio, value=[0.0])
        if value is not image:  # get_params returns the image itself where it found no box in 10 tries
            return torch.tensor([top, left, h, w])
    return torch.zeros(4, dtype=torch.long)


class CifarTrain(Dataset):
    """The training images ([N, 32, 32, 3] uint8) with `train_transform`'s per-image draws, in the DataLoader's
    workers: crop, flip and AutoAugment on the PIL image, then random erasing's box; each item is the uint8 image
    [3, 32, 32], its box and its label. `finish_batch` then converts, normalises and erases a whole batch at once,
    so that the workers skip three small tensor ops per image (ToTensor, Normalize, erase), about a fifth of their time,
    for the same images as `train_transform` with the same random numbers (tests/test_lee_reference.py)."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        from torchvision import transforms as T
        self.x, self.y, self.transform = x, np.asarray(y, dtype=np.int64), pil_transform()
        self.eraser = T.RandomErasing(p=ERASE_P)  # built once: only its draw runs per image

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor
        image = pil_to_tensor(self.transform(Image.fromarray(self.x[i])))  # [3, 32, 32] uint8
        return image, erase_box(image, self.eraser), int(self.y[i])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 / 255 (ToTensor), normalised with the CIFAR mean / std, on the images' device."""
    mean = torch.tensor(CIFAR_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def finish_batch(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The rest of `train_transform` for a batch, on its device: uint8 [B, 3, H, W] -> float / 255 (ToTensor),
    normalised with the CIFAR mean / std, each image's box [B, 4] (top, left, height, width) set to 0."""
    x = normalize(images)  # [B, 3, H, W]
    rows = torch.arange(x.shape[2], device=x.device)
    cols = torch.arange(x.shape[3], device=x.device)
    top, left, h, w = (boxes[:, k, None] for k in range(4))  # each [B, 1]
    inside = (((rows >= top) & (rows < top + h))[:, :, None]  # [B, H, 1]
              & ((cols >= left) & (cols < left + w))[:, None, :])  # [B, 1, W] -> [B, H, W]
    return x.masked_fill(inside[:, None], 0.0)


class EpochSampler(Sampler):
    """Lee et al.'s "repeated augmentation" as their code runs it: the RASampler of their `utils/sampler.py`, called as
    `RASampler(len(train_dataset), batch_size, 1, args.ra)`, i.e. one instance per image (`repetitions=1`) and an
    epoch `len_factor=ra=3` times the dataset's length. An epoch is therefore `passes` fresh permutations of the
    dataset one after the other: every image `passes` times per epoch, each time augmented anew
    (DeiT's RASampler, three copies of a third of the images per epoch, is another thing).

    The order depends only on (seed, epoch): call `set_epoch` before each epoch, as with DistributedSampler.
    """

    def __init__(self, size: int, passes: int = 3, seed: int = 0) -> None:
        if size < 1 or passes < 1:
            raise ValueError(f"EpochSampler needs size >= 1 and passes >= 1, got size {size}, passes {passes}")
        self.size, self.passes, self.seed, self.epoch = size, passes, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)  # distinct per (seed, epoch)
        return iter(torch.cat([torch.randperm(self.size, generator=generator) for _ in range(self.passes)]).tolist())

    def __len__(self) -> int:
        return self.size * self.passes


class BatchMixer:
    """CutMix (alpha 1.0) or MixUp (alpha 0.8), one chosen at random, applied to a batch with probability `prob`
    (DeiT's settings). Returns the images and soft targets [B, classes], one-hot where the batch is not mixed."""

    def __init__(self, num_classes: int = NUM_CLASSES, prob: float = 0.5, cutmix_alpha: float = 1.0,
                 mixup_alpha: float = 0.8, seed: int = 0) -> None:
        from torchvision.transforms import v2
        self.num_classes, self.prob = num_classes, prob
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)
        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)
        self.generator = torch.Generator().manual_seed(seed)  # the choices; lambda and the box use torch's global RNG

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, str]:
        """(images, soft targets, which: 'cutmix', 'mixup' or 'none')."""
        draws = torch.rand(2, generator=self.generator).tolist()
        if draws[0] >= self.prob:
            return images, F.one_hot(labels, self.num_classes).float(), "none"
        which = "cutmix" if draws[1] < 0.5 else "mixup"
        images, targets = (self.cutmix if which == "cutmix" else self.mixup)(images, labels)
        return images, targets, which


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy against soft targets after label smoothing: t (1 - s) + s / C, which for one-hot targets is
    F.cross_entropy(label_smoothing=s), and for mixed ones smooths each of the two labels, as timm's Mixup does."""
    targets = targets * (1 - smoothing) + smoothing / targets.shape[1]
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def lr_at(step: int, steps_per_epoch: int, peak: float, warmup_epochs: float, epochs: float) -> float:
    """Per step: linear from 0 to `peak` over `warmup_epochs`, then a cosine to 0 at `epochs` (a run shorter than the
    paper's keeps its proportion, 10 warmup epochs of 100)."""
    warmup_epochs = min(warmup_epochs, epochs * 10 / 100)
    t = step / steps_per_epoch
    if t < warmup_epochs:
        return peak * t / warmup_epochs
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (t - warmup_epochs) / (epochs - warmup_epochs))))


def to_normalized(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """[N, 32, 32, 3] uint8 -> [N, 3, 32, 32] float32, normalised with the CIFAR mean / std (the test images)."""
    return normalize(torch.as_tensor(x, device=device).permute(0, 3, 1, 2))


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast: bool) -> float:
    """Top-1 accuracy on (x, y), in eval mode (no stochastic depth)."""
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for i in range(0, len(x), batch_size):
            correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    model.train()
    return correct / len(x)


def train(data_dir: str, epochs: int = 100, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.05,
          warmup_epochs: float = 10, smoothing: float = 0.1, passes: int = 3, width: int = 192, depth: int = 9,
          seed: int = 0, workers: int = 0, train_steps: Optional[int] = None, eval_images: Optional[int] = None,
          eval_every: int = 1, compile_model: bool = False, cudagraphs: bool = False,
          out: Optional[str] = None) -> Dict:
    """Train and evaluate; returns the per-epoch rows and the run's totals. cudagraphs: compile in torch's
    "reduce-overhead" mode, which replays the compiled forward and backward as CUDA graphs (a GPU only)."""
    start = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    model = build_model(width, depth).to(device)  # first: a missing timm stops the run before any data is read
    print(f"lee_reference: ViT width {width}, depth {depth}, {width // HEAD_DIM} heads: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    train_set, test_set = read_cifar_folder(find_cifar_folder(data_dir, NUM_CLASSES), NUM_CLASSES)
    dataset = CifarTrain(train_set["x"], train_set["y"])
    sampler = EpochSampler(len(dataset), passes, seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
                        persistent_workers=workers > 0, pin_memory=gpu,
                        generator=torch.Generator().manual_seed(seed))  # the workers' seeds
    steps = len(loader)
    if steps == 0:
        raise SystemExit(f"batch size {batch_size} is larger than the {len(dataset)} training images")
    if train_steps:
        steps = min(steps, train_steps)
    n_test = len(test_set["x"]) if eval_images is None else min(eval_images, len(test_set["x"]))
    x_test = to_normalized(test_set["x"][:n_test], device)
    y_test = torch.as_tensor(test_set["y"][:n_test], device=device).long()
    mixer = BatchMixer(seed=seed)
    # fused: one kernel for every parameter on a GPU (the same update), as a PyTorch user would pick for speed
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=weight_decay, fused=gpu)
    cudagraphs = cudagraphs and gpu
    # a step of this small model at batch 128 is launch-bound: replayed as CUDA graphs it is several times faster
    step_fn = (torch.compile(model, mode="reduce-overhead" if cudagraphs else None) if compile_model or cudagraphs
               else model)
    rows, train_seconds, step, best = [], 0.0, 0, None
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        if gpu:
            torch.cuda.synchronize()
        epoch_start, losses = time.perf_counter(), []
        for images, boxes, labels in itertools.islice(loader, steps):  # islice: a capped epoch fetches no extra batch
            images = finish_batch(images.to(device, non_blocking=True), boxes.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            if cudagraphs:  # a new step: the CUDA graphs may now overwrite the last step's outputs
                torch.compiler.cudagraph_mark_step_begin()
            images, targets, _ = mixer(images, labels)
            step += 1
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup_epochs, epochs)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu):
                loss = soft_target_loss(step_fn(images), targets, smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if gpu:
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - epoch_start  # training only; the data reading and eval excluded
        train_loss = torch.stack(losses).mean().item()
        accuracy = None
        if epoch % eval_every == 0 or epoch == epochs:  # the last epoch is always evaluated
            # eager under CUDA graphs: recording eval-mode graphs as well would buy little for 20 batches an epoch
            accuracy = evaluate(model if cudagraphs else step_fn, x_test, y_test, 500, gpu)
            best = accuracy if best is None else max(best, accuracy)
        rows.append(dict(epoch=epoch, train_loss=train_loss, test_accuracy=accuracy,
                         seconds=time.perf_counter() - start))
        shown = "-" if accuracy is None else f"{accuracy:.4f} (best {best:.4f})"
        print(f"lee_reference: epoch {epoch}/{epochs}; train loss {train_loss:.4f}; test accuracy {shown}; "
              f"lr {opt.param_groups[0]['lr']:.2e}; training time {train_seconds:.1f} s", flush=True)
        if out:  # rewritten after every epoch, so that a stopped run keeps its curve
            write_csv(out, rows)
    return dict(rows=rows, final=rows[-1]["test_accuracy"], best=best, train_seconds=train_seconds,
                wall_seconds=time.perf_counter() - start, images=step * batch_size, n_test=n_test)


def write_csv(path: str, rows: List[Dict]) -> None:
    """epoch, train_loss, test_accuracy (empty where not evaluated), seconds (wall time since train() began)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["epoch", "train_loss", "test_accuracy", "seconds"])
        for r in rows:
            accuracy = "" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
            writer.writerow([r["epoch"], f"{r['train_loss']:.4f}", accuracy, f"{r['seconds']:.1f}"])


def main(argv: List[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="folder holding cifar-10-batches-py")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3,
                        help="passes over the training images per epoch: 3 as the authors' code (--ra 3); 1 gives "
                             "the compute of a 100-epoch run of the apps")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader processes for the per-image augmentation (0: in the main process)")
    parser.add_argument("--eval_every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--cudagraphs", action="store_true",
                        help="torch.compile the model in mode reduce-overhead: its step as CUDA graphs (on a GPU)")
    parser.add_argument("--out", default=None, help="CSV of epoch, train loss, test accuracy, seconds")
    parser.add_argument("--width", type=int, default=192, help="192: the paper's ViT; smaller for smoke tests")
    parser.add_argument("--depth", type=int, default=9, help="9: the paper's ViT; smaller for smoke tests")
    parser.add_argument("--train_steps", type=int, default=None, help="cap on steps per epoch (smoke tests)")
    parser.add_argument("--eval_images", type=int, default=None, help="cap on test images evaluated (smoke tests)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.eval_every < 1:
        parser.error("--epochs and --eval_every must be at least 1")
    result = train(args.data_dir, epochs=args.epochs, batch_size=args.batch_size, passes=args.passes, width=args.width,
                   depth=args.depth, seed=args.seed, workers=args.workers, train_steps=args.train_steps,
                   eval_images=args.eval_images, eval_every=args.eval_every, compile_model=args.compile,
                   cudagraphs=args.cudagraphs, out=args.out)
    final, best = 100 * result["final"], 100 * result["best"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"lee_reference: final test accuracy {final:.2f}%, best {best:.2f}% ({result['n_test']} test images) "
          f"after {args.epochs} epochs; {result['wall_seconds']:.1f} s wall, "
          f"{result['images'] / result['train_seconds']:.0f} training images/s on {device}; Lee et al.'s ViT on the "
          f"original CIFAR-10: {PUBLISHED:.2f}% (difference {final - PUBLISHED:+.2f} points)", flush=True)
    return result


if __name__ == "__main__":
    main()
