"""pipelines/batched.py: the batched ops give the per-sample apphub ops' results, in distribution where random; and
pipelines/loader.py's BatchLoader."""
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from fastestimator.op.numpyop.multivariate import HorizontalFlip as NpFlip
from fastestimator.op.numpyop.multivariate import PadIfNeeded as NpPad
from fastestimator.op.numpyop.multivariate import RandomCrop as NpCrop
from fastestimator.op.numpyop.univariate import CoarseDropout as NpDropout
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.batched import (CIFAR10_POLICY, POLICIES, RANDAUGMENT_RANGES, WIDE_RANGES, AutoAugment, CoarseDropout,
                               HorizontalFlip, MixUpCutMix, PadIfNeeded, RandomCrop, TrivialAugment, batched_cifar_ops)
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD, cifar_ops
from pipelines.loader import BatchLoader
from tests.conftest import cli_env

N = 2000  # samples per distribution check


def _np(op, image):
    """Run a per-sample FastEstimator NumpyOp on one HWC image."""
    out = op.forward([image] if op.in_list else image, {})
    return out[0] if op.out_list else out


def _coded(n=1, h=32, w=32):
    """Images whose pixel value encodes its position (row * 100 + col, same in every channel): [n, 3, h, w]."""
    code = (np.arange(h)[:, None] * 100 + np.arange(w)[None, :]).astype(np.float32)
    return torch.tensor(np.broadcast_to(code, (n, 3, h, w)).copy())


def _offsets(crops):
    """Top-left (row, col) in the 40x40 padded image of 32x32 crops of `_coded` images (padded with reflection)."""
    return [(int(c[0, 0, 0]) // 100, int(c[0, 0, 0]) % 100) for c in crops]


def test_eval_ops_match_the_per_sample_pipeline_exactly():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    expected = image
    for op in cifar_ops(augment=False):
        expected = _np(op, expected)
    x = torch.tensor(image[None])
    for op in batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, augment=False):
        x = op.forward(x, {})
    np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_padding_is_albumentations_reflect_101():
    image = np.random.default_rng(1).normal(size=(32, 32, 3)).astype(np.float32)
    expected = _np(NpPad(min_height=40, min_width=40, image_in="x", image_out="x"), image)
    padded = PadIfNeeded("x", "x", min_height=40, min_width=40).forward(torch.tensor(image).permute(2, 0, 1)[None], {})
    np.testing.assert_array_equal(padded[0].permute(1, 2, 0).numpy(), expected)


def test_crop_offsets_have_the_per_sample_distribution():
    padded = _coded(h=40, w=40)  # code the padded image directly, so every offset is readable
    ours = _offsets(RandomCrop("x", "x", 32, 32).forward(padded.expand(N, -1, -1, -1).contiguous(), {}))
    theirs = _offsets([torch.tensor(_np(NpCrop(32, 32, image_in="x", image_out="x"),
                                        padded[0].permute(1, 2, 0).numpy())).permute(2, 0, 1) for _ in range(N)])
    for offsets in (ours, theirs):
        rows, cols = np.array(offsets).T
        assert set(rows) == set(cols) == set(range(9))  # 0..8 inclusive
        counts = np.bincount(rows * 9 + cols, minlength=81)
        assert counts.min() > N / 81 * 0.3 and counts.max() < N / 81 * 2.0  # roughly uniform over the 81 offsets


def test_flip_probability_is_one_half_like_sometimes_horizontal_flip():
    x = _coded(N)
    flipped = HorizontalFlip("x", "x").forward(x, {})
    ours = (flipped[:, 0, 0, 0] != 0).float().mean().item()  # pixel (0, 0) holds 0 unless mirrored
    assert torch.equal(flipped[flipped[:, 0, 0, 0] != 0], x[flipped[:, 0, 0, 0] != 0].flip(-1))
    from fastestimator.op.numpyop.meta import Sometimes
    op = Sometimes(NpFlip(image_in="x", image_out="x"))
    image = x[0].permute(1, 2, 0).numpy()
    theirs = np.mean([_np(op, image)[0, 0, 0] != 0 for _ in range(N)])
    assert abs(ours - 0.5) < 0.05 and abs(theirs - 0.5) < 0.05


def _holes(images):
    """(top, left, height, width) of the zero region of each [C, H, W] image (codes are never 0 except (0, 0))."""
    out = []
    for img in images:
        zero = (img[0] == 0)
        zero[0, 0] = zero[0, 0] and bool(zero[0, 1] or zero[1, 0])  # pixel (0, 0) codes as 0 itself
        rows, cols = np.nonzero(np.asarray(zero))
        out.append((rows.min(), cols.min(), rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, zero.sum()))
    return out


def test_coarse_dropout_has_the_per_sample_distribution():
    x = _coded(N) + 1  # no zero pixels of their own
    ours = _holes(CoarseDropout("x", "x", max_holes=1).forward(x, {}).numpy())
    op = NpDropout(inputs="x", outputs="x", max_holes=1)
    theirs = _holes([_np(op, x[0].permute(1, 2, 0).numpy()).transpose(2, 0, 1) for _ in range(N)])
    for holes in (ours, theirs):
        tops, lefts, heights, widths, areas = np.array(holes).T
        assert set(heights) == set(widths) == {8} and set(areas) == {64}  # exactly one 8x8 hole
        assert set(tops) == set(lefts) == set(range(25))  # anywhere fully inside: 0..24
        assert abs(tops.mean() - 12) < 1 and abs(lefts.mean() - 12) < 1


def test_strong_augmentation_keeps_shapes_and_soft_labels_sum_to_one():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    y = torch.randint(0, 10, (64, ), dtype=torch.uint8)
    data = {"x": x, "y": y}
    for _ in range(5):  # MixUp, CutMix and no mixing are chosen at random per batch
        batch = dict(data)
        for op in batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10, label_smoothing=0.1,
                                    mix_prob=0.8):
            inputs = [batch[k] for k in op.inputs]
            out = op.forward(inputs if op.in_list else inputs[0], {})
            for k, v in zip(op.outputs, out if op.out_list else [out]):
                batch[k] = v
        assert batch["x"].shape == (64, 3, 32, 32) and torch.isfinite(batch["x"]).all()
        assert batch["y_soft"].shape == (64, 10)
        torch.testing.assert_close(batch["y_soft"].sum(1), torch.ones(64))
        assert batch["y_soft"].min() >= 0.01 - 1e-6  # label smoothing: 0.1 / 10 everywhere at least


def test_mixup_cutmix_needs_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True)
    assert MixUpCutMix(("x", "y"), ("x", "y_soft"), num_classes=3).mode == {"train"}


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_batch_loaders_hold_their_arrays_contiguous_on_the_device_and_share_tensors_given_there(device):
    """Arrays in any memory order (CIFAR's images: an NHWC view of the files' NCHW planes; reversed axes; read-only)
    become contiguous tensors on the loader's device with the same values, so batches are as from a contiguous copy;
    tensors already there are shared, not copied: the apps' student and teacher loaders hold one copy of the data."""
    from pipelines.loader import device_arrays
    planes = np.random.default_rng(0).integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    frozen = planes.copy()
    frozen.flags.writeable = False
    labels = np.arange(12)
    device = torch.device(device)
    for images in (planes.transpose(0, 2, 3, 1), planes[::-1].transpose(0, 2, 3, 1), frozen.transpose(0, 2, 3, 1)):
        loader = BatchLoader({"x": images, "y": labels}, 5, shuffle=False, device=device)
        held = loader.dataset.arrays["x"]
        assert held.device.type == device.type and held.is_contiguous()
        batches = list(loader)
        assert torch.equal(torch.cat([b["x"] for b in batches]).cpu(), torch.from_numpy(np.ascontiguousarray(images)))
        assert batches[0]["x"].is_contiguous()
    shuffled = BatchLoader({"x": planes.transpose(0, 2, 3, 1), "y": labels}, 5, shuffle=True, device=device)
    rng_state = torch.cuda.get_rng_state if device.type == "cuda" else torch.get_rng_state  # where an order is drawn
    state = rng_state()
    first = shuffled.first_batch()  # the arrays' first batch, no order drawn
    assert torch.equal(rng_state(), state)
    assert torch.equal(first["x"], batches[0]["x"]) and first["y"].tolist() == [0, 1, 2, 3, 4]
    shared = device_arrays({"x": planes.transpose(0, 2, 3, 1), "y": labels}, device)
    student, teacher = (BatchLoader(shared, 4, shuffle=True, device=device) for _ in range(2))
    assert student.dataset.arrays["x"].data_ptr() == teacher.dataset.arrays["x"].data_ptr() \
        == shared["x"].data_ptr()


def test_batch_loader_yields_whole_shuffled_batches_of_every_sample():
    arrays = {"x": np.arange(10)[:, None].repeat(3, 1).astype(np.uint8), "y": np.arange(10)}
    loader = BatchLoader(arrays, batch_size=4, shuffle=True, device=torch.device("cpu"))
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [4, 4, 2] and len(loader) == 3
    assert sorted(torch.cat([b["y"] for b in batches]).tolist()) == list(range(10))
    assert all(torch.equal(b["x"][:, 0].long(), b["y"]) for b in batches)  # rows stay together
    assert [b["y"].tolist() for b in BatchLoader(arrays, 4, shuffle=False)][0] == [0, 1, 2, 3]
    assert [b["y"].tolist() for b in BatchLoader(arrays, 4, shuffle=False)] != [b["y"].tolist() for b in batches]
    dropped = BatchLoader(arrays, batch_size=4, shuffle=True, drop_last=True)
    assert len(dropped) == 2 and [len(b["y"]) for b in dropped] == [4, 4]


def _apply(ops, batch, mode):
    batch = dict(batch)
    for op in ops:
        if op.mode and mode not in op.mode:
            continue
        inputs = [batch[k] for k in op.inputs]
        out = op.forward(inputs if op.in_list else inputs[0], {})
        for k, v in zip(op.outputs, out if op.out_list else [out]):
            batch[k] = v
    return batch


@pytest.mark.parametrize("strong", [False, True])
def test_fused_ops_give_the_same_images_as_the_separate_ops(strong):
    """fuse=True (what the apps run) is the same chain: identical outputs from the same random state, per mode."""
    x = torch.randint(0, 256, (32, 32, 32, 3), dtype=torch.uint8)
    batch = {"x": x, "y": torch.randint(0, 10, (32, ))}
    kwargs = dict(strong=strong, num_classes=10, label_smoothing=0.1, mix_prob=0.8)
    separate = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, **kwargs)
    fused = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, fuse=True, **kwargs)
    assert type(fused[0]).__name__ == "FusedImageOps" and fused[0].mode == {"train"}
    for mode in ("train", "eval"):
        torch.manual_seed(1)
        want = _apply(separate, batch, mode)
        torch.manual_seed(1)
        got = _apply(fused, batch, mode)
        assert set(got) == set(want)
        for key in want:
            torch.testing.assert_close(got[key], want[key])
    assert not torch.equal(_apply(fused, batch, "train")["x"], _apply(fused, batch, "eval")["x"])  # augmented


def test_fused_ops_compile_on_cpu():
    """The compiled chain (the GPU default) runs and keeps shapes and value range; compile is exercised on CPU."""
    pytest.importorskip("torch._inductor")
    fused = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, fuse=True, compile=True)[0]
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    out = fused.forward(x, {})
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out == 0).any()  # the CoarseDropout hole survives compilation


class HostToDeviceCopies(TorchDispatchMode):
    """Records every copy of a host tensor into a CUDA tensor: what a CUDA graph capture refuses ("Cannot copy between
    CPU and CUDA tensors during CUDA graph capture unless the CPU tensor is pinned")."""
    def __init__(self) -> None:
        super().__init__()
        self.copies = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func is torch.ops.aten.copy_.default and tensors[0].device.type == "cuda" and \
                any(t.device.type == "cpu" for t in tensors[1:]):
            self.copies.append(str(func))
        if func is torch.ops.aten._to_copy.default and tensors[0].device.type == "cpu" and \
                torch.device(kwargs.get("device") or "cpu").type == "cuda":
            self.copies.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("strong,policy", [(False, "autoaugment"), (True, "autoaugment"), (True, "trivialaugment")])
def test_the_uncompiled_chain_copies_nothing_from_the_host_inside_a_step(strong, policy):
    """A GPU train step is captured as a CUDA graph with the chain in it, compiled or not (`compile=False`, the
    teacher's): on CUDA tensors (fake ones here, no GPU needed) the chain's step must not copy from the host. A
    `kernel[1, 1] = 5.0` in Sharpness did, once per policy operation: the capture failed and the student's training
    ran 4.6x slower without its graph."""
    fused = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, fuse=True, strong=strong, num_classes=10, policy=policy)[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            x = torch.empty(8, 32, 32, 3, dtype=torch.uint8, device="cuda")
        except (RuntimeError, AssertionError) as err:  # a torch built without CUDA
            pytest.skip(f"this torch cannot make fake CUDA tensors: {err}")
        fused.prepare(x.device)  # what FusedImageOps.forward makes once per device, before the step is captured
        with HostToDeviceCopies() as watch:
            out = fused.forward(x, {})
    assert out.shape == (8, 3, 32, 32) and out.device.type == "cuda"
    assert watch.copies == []


@pytest.mark.parametrize("space", ["wide", "ra"])
@pytest.mark.parametrize("name", TrivialAugment.OPS)
def test_trivialaugment_ops_are_torchvisions(name, space):
    """Each operation, at several magnitudes and both signs, gives torchvision's result on uint8 images (off by one
    grey level in some pixels at most, from float rounding): TrivialAugmentWide's magnitudes for space "wide"
    (TrivialAugment's), RandAugment's for "ra" (the ranges AutoAugment's policy uses)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import autoaugment as tv
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    spaces = {"wide": lambda: tv.TrivialAugmentWide()._augmentation_space(TrivialAugment.NUM_BINS),
              "ra": lambda: tv.RandAugment()._augmentation_space(TrivialAugment.NUM_BINS, (32, 32))}
    magnitudes, signed = spaces[space]()[name]
    ta, n = TrivialAugment("x", "x", fill=0.0), images.shape[0]  # torchvision fills with black
    ranges = {"wide": WIDE_RANGES, "ra": RANDAUGMENT_RANGES}[space]
    for level in (0, 7, 19, 30):
        for sign in ((1.0, -1.0) if signed else (1.0, )):
            magnitude = sign * float(magnitudes[level]) if magnitudes.ndim else 0.0
            expected = torch.stack([tv._apply_op(i, name, magnitude, InterpolationMode.NEAREST, [0.0]) for i in images])
            ours = ta.apply(images.float(), torch.full((n, ), TrivialAugment.OPS.index(name)),
                            torch.full((n, ), level / (TrivialAugment.NUM_BINS - 1)), torch.full((n, ), sign),
                            ranges)
            diff = (ours - expected.float()).abs()
            # off by one only: torchvision truncates float results such as 116.99999 for an unchanged 117 (Sharpness
            # keeps the border, where that happens to up to 7% of the pixels); a wrong operation is off by far more
            assert diff.max() <= 1 and (diff > 0).float().mean() < 0.1, (name, level, sign, diff.max())


def _record_draws(monkeypatch, op_class, *names):
    """Replace `op_class.apply` with a recorder of the per-image draws it is given (by these names); returns the
    record, filled at the next forward."""
    drawn = {}

    def record(self, x, *draws):
        drawn.update(zip(names, draws))
        return x

    monkeypatch.setattr(op_class, "apply", record)
    return drawn


def test_trivialaugment_draws_one_op_per_image_uniformly(monkeypatch):
    drawn = _record_draws(monkeypatch, TrivialAugment, "op", "level", "sign")
    x = torch.full((14 * 300, 3, 8, 8), 100, dtype=torch.uint8)
    TrivialAugment("x", "x").forward(x, {})
    counts = torch.bincount(drawn["op"], minlength=14)
    assert counts.min() > 200 and counts.max() < 400  # about 300 per operation: each image draws its own
    bins = torch.bincount((drawn["level"] * 30).round().long(), minlength=31)
    assert len(bins) == 31 and bins.min() > 70  # every one of the 31 magnitude bins, about 135 each
    assert abs((drawn["sign"] > 0).float().mean().item() - 0.5) < 0.05


def test_trivialaugment_varies_per_image_and_keeps_the_pixel_range():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    out = TrivialAugment("x", "x").forward(image.expand(64, -1, -1, -1), {})
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.floor())
    distinct = {tuple(o.flatten()[::97].tolist()) for o in out}
    assert len(distinct) > 20  # not one transformation for the whole batch


def test_autoaugment_policy_table_is_torchvisions():
    """The CIFAR-10 policy written in pipelines/batched.py is torchvision's, every name, probability and bin."""
    from torchvision.transforms import autoaugment as tv
    theirs = tv.AutoAugment(tv.AutoAugmentPolicy.CIFAR10).policies
    assert [tuple(map(tuple, policy)) for policy in theirs] == [tuple(map(tuple, policy)) for policy in CIFAR10_POLICY]
    assert AutoAugment("x", "x").policies == CIFAR10_POLICY


def test_the_strong_augmentation_imports_no_torchvision():
    """Building and running the default strong chain imports no torchvision (a second of the apps' start-up, waiting
    for the compiler's imports, for a 25-row table). In a fresh interpreter, where nothing imported torchvision yet."""
    code = "import sys, torch\n" + inspect.getsource(_apply) + """
from pipelines.batched import batched_cifar_ops
from pipelines.cifar import CIFAR_MEAN, CIFAR_STD
assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)
ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10)
batch = {"x": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8), "y": torch.zeros(4, dtype=torch.long)}
batch = _apply(ops, batch, "train")
assert "AutoAugment" in [type(op).__name__ for op in ops] and batch["x"].shape == (4, 3, 32, 32)
print(sorted(name for name in sys.modules if name.split(".")[0] == "torchvision"))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout[-2000:]


@pytest.mark.parametrize("policy_id", range(25))
def test_autoaugment_sub_policies_are_torchvisions(policy_id):
    """Each CIFAR-10 sub-policy, with each operation on or off and either sign, gives torchvision's AutoAugment result
    on uint8 images (off by a grey level or two in a few pixels at most, from float rounding, as for TrivialAugment)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import autoaugment as tv
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    aa, n = AutoAugment("x", "x", fill=0.0), images.shape[0]  # torchvision fills with black
    space = tv.AutoAugment()._augmentation_space(10, (32, 32))
    for applied in ((True, True), (True, False), (False, True)):
        for sign in ((1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)):
            expected = []
            for image in images:
                for j, (name, _, magnitude_bin) in enumerate(aa.policies[policy_id]):
                    if applied[j]:
                        magnitudes, signed = space[name]
                        magnitude = float(magnitudes[magnitude_bin]) if magnitude_bin is not None else 0.0
                        magnitude *= sign[j] if signed else 1.0
                        image = tv._apply_op(image, name, magnitude, InterpolationMode.NEAREST, [0.0])
                expected.append(image)
            ours = aa.apply(images.float(), torch.full((n, ), policy_id), torch.tensor([applied] * n),
                            torch.tensor([sign] * n))
            diff = (ours - torch.stack(expected).float()).abs()
            # one grey level per operation (the second can carry the first's off-by-one on, scaled by its factor)
            assert diff.max() <= 2 and (diff > 0).float().mean() < 0.1, (aa.policies[policy_id], applied, sign)


def test_autoaugment_draws_sub_policies_probabilities_and_signs_per_image(monkeypatch):
    drawn = _record_draws(monkeypatch, AutoAugment, "pick", "applied", "sign")
    aa = AutoAugment("x", "x")
    aa.forward(torch.full((25 * 400, 3, 8, 8), 100, dtype=torch.uint8), {})
    counts = torch.bincount(drawn["pick"], minlength=25)
    assert counts.min() > 300 and counts.max() < 500  # about 400 per sub-policy: each image draws its own
    probs = torch.tensor([[p for _, p, _ in policy] for policy in aa.policies])  # [25, 2]
    for policy_id in range(25):
        rate = drawn["applied"][drawn["pick"] == policy_id].float().mean(0)
        assert torch.allclose(rate, probs[policy_id], atol=0.1), (policy_id, rate, probs[policy_id])
    assert abs((drawn["sign"] > 0).float().mean().item() - 0.5) < 0.02


def test_strong_ops_order_and_mixing_choice():
    assert POLICIES == ("autoaugment", "trivialaugment")
    ops = batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10)  # the defaults: AutoAugment, no mixing
    names = [type(op).__name__ for op in ops]
    assert names.index("AutoAugment") < names.index("Normalize")  # it works on pixel values
    assert "MixUpCutMix" not in names and "TrivialAugment" not in names
    names = [type(op).__name__ for op in batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10,
                                                           policy="trivialaugment", mix_prob=0.8)]
    assert names.index("TrivialAugment") < names.index("Normalize")
    assert "MixUpCutMix" in names and "AutoAugment" not in names
    for gone in ("randaugment", "affine", "trivialaugment_ra"):
        with pytest.raises(ValueError, match="policy must be one of"):
            batched_cifar_ops(CIFAR_MEAN, CIFAR_STD, strong=True, num_classes=10, policy=gone)
