"""Vision Transformer with a Conv2d patch embedding.

Follows Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), in the shape of FastEstimator's apphub
`image_classification/vit/vit_torch.py`: the parameter names (and so `state_dict` keys) are the apphub's, so a
checkpoint trained with that app loads into this model. The `ViTConfig` defaults are the apphub's architecture
(post-norm blocks, the head reading the CLS token, dropout 0.1); the options below change it, and the apps' recipes
choose norm placement, pooling, SPT and LSA (see apphub_vit/recipes.py). Differences from the apphub, all optional or
invisible to checkpoints:

* batch-first attention throughout (the apphub transposes to sequence-first and back);
* `norm_first=True` gives the pre-norm block of the paper and timm (the apphub's is post-norm);
* `pool="mean"` has the head read the mean of the patch tokens instead of the CLS token (same parameters);
* `drop_path` adds stochastic depth (Huang et al. 2016) for longer training recipes;
* `lsa=True` gives Locality Self-Attention (Lee et al. 2021, "Vision Transformer for Small-Size Datasets";
  aanna0701/SPT_LSA_ViT): a learnt softmax temperature per head, and no token attends to itself. Off by default, so
  the apphub's checkpoints keep loading; on, each block has one more parameter, `attn_scale`;
* `spt=True` gives their Shifted Patch Tokenization: the image and four copies shifted diagonally by half a patch,
  stacked as channels, each patch layer-normalised, then the same Conv2d patch embedding (on 5x the channels);
* `stem="conv"` replaces the one patchify Conv2d by the convolutional tokenizer of Compact Convolutional Transformers
  (Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers"; SHI-Labs/Compact-Transformers):
  per halving of the resolution a 3x3 Conv2d, ReLU and a 3x3 max-pool of stride 2, so patch 4 gives two stages and
  the same 8x8 tokens; the early convolutions of Xiao et al. 2021 ("Early Convolutions Help Transformers See
  Better") in CCT's form, made for small data sets;
* `drloc` > 0 adds Liu et al. 2021's dense relative localization (networks/drloc.py): in training the model also
  returns that weight times the auxiliary loss, `(logits, loss)`, as timm's distilled ViT returns two heads' outputs
  in training only; eval and inference return the logits alone;
* `guide` > 0 adds locality guidance (Li et al. 2022, "Locality Guidance for Improving Vision Transformers on Tiny
  Datasets"; lkhl/tiny-transformers), a FitNets-style hint (Romero et al. 2015): in training the middle block's patch
  tokens, through a LayerNorm and a linear map to a CNN teacher's channels, are also returned, for a loss that has
  them imitate the teacher's feature map at the same grid (apphub_vit/teacher.py, `LocalityGuidance`, weight `guide`);
  a CNN's local-to-global features for the layers that on small data learn locality slowest;
* `distill_head=True` adds DeiT's distillation head (Touvron et al. 2021; timm's `VisionTransformerDistilled`): a
  second linear head, for a teacher's labels, on a token of its own. With `pool="mean"` the CLS token is that token:
  the class head reads the mean of the patch tokens, so the CLS token's output is free for the second head, and no
  token is added. In training the model returns both heads' logits, `(logits, distill_logits)`; eval and inference
  return their mean, as DeiT and timm do;
* invalid configurations raise `ValueError` instead of an `assert`.

Layout (timm `vision_transformer.py`): `ViTEmbeddings` -> `ViTEncoder.forward` (the pooled, layer-normalised
embedding) -> `linear_classifier`.
"""
from dataclasses import asdict, dataclass, replace
from typing import Any, Dict, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.drloc import DenseRelativeLoc
from networks.resnet9 import MAP_CHANNELS

STEMS = ("patch", "conv")  # how the image becomes tokens (ViTEmbeddings)


@dataclass(frozen=True)
class ViTConfig:
    """Architecture hyperparameters. The defaults are the apphub's CIFAR model (6 layers, dim 256, patch 4, 3.2M)."""
    num_layers: int = 6
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    em_dim: int = 256
    num_heads: int = 8
    ff_dim: int = 512
    drop: float = 0.1
    norm_first: bool = False
    drop_path: float = 0.0
    pool: str = "cls"  # what the head reads: the CLS token's output ("cls") or the mean of the patch tokens ("mean")
    lsa: bool = False  # Locality Self-Attention (Lee et al. 2021): learnt temperature per head, no attention to self
    spt: bool = False  # Shifted Patch Tokenization (Lee et al. 2021): diagonal half-patch shifts as extra channels
    stem: str = "patch"  # the tokens: one Conv2d of kernel = stride = patch ("patch") or CCT's 3x3 Conv2d ("conv")
    drloc: float = 0.0  # weight of the dense relative localization loss in training (Liu et al. 2021; 0: no head)
    distill_head: bool = False  # DeiT's distillation head on the CLS token's output (needs pool="mean")
    guide: float = 0.0  # weight of locality guidance in training: the middle block imitates a CNN's map (0: no head)

    def __post_init__(self) -> None:
        for name in ("num_layers", "image_size", "patch_size", "num_channels", "em_dim", "num_heads", "ff_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViT {name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViT image_size={self.image_size} is not divisible by patch_size={self.patch_size}: "
                             f"choose a patch size that divides the image size (e.g. 4 for 32x32 images)")
        if self.em_dim % self.num_heads:
            raise ValueError(f"ViT em_dim={self.em_dim} is not divisible by num_heads={self.num_heads}: "
                             f"each attention head gets em_dim / num_heads channels")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"ViT pool must be 'cls' (the CLS token) or 'mean' (average of the patch tokens), "
                             f"got {self.pool!r}")
        if not isinstance(self.lsa, bool):
            raise ValueError(f"ViT lsa must be True or False (Locality Self-Attention on or off), got {self.lsa!r}")
        if not isinstance(self.spt, bool):
            raise ValueError(f"ViT spt must be True or False (Shifted Patch Tokenization on or off), got {self.spt!r}")
        if self.spt and self.patch_size < 2:
            raise ValueError(f"ViT spt shifts by half a patch, so it needs patch_size >= 2, got {self.patch_size}")
        if self.stem not in STEMS:
            raise ValueError(f"ViT stem must be 'patch' (one Conv2d per patch) or 'conv' (a stack of 3x3 Conv2d, "
                             f"Hassani et al. 2021), got {self.stem!r}")
        if self.stem == "conv":
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                raise ValueError(f"ViT stem='conv' halves the resolution once per stage, so patch_size must be a power "
                                 f"of 2 (2, 4, 8, ...), got {self.patch_size}: use stem='patch' for this patch size")
            if self.spt:
                raise ValueError("ViT spt=True shifts the patches of the patch stem; stem='conv' sees the neighbouring "
                                 "pixels through its 3x3 convolutions instead: use spt=False with stem='conv', or "
                                 "spt=True with stem='patch'")
        for name in ("drop", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ViT {name} must be in [0, 1), got {getattr(self, name)!r}")
        if isinstance(self.drloc, bool) or not isinstance(self.drloc, (int, float)) or not self.drloc >= 0:
            raise ValueError(f"ViT drloc is the weight of the dense relative localization loss: a number >= 0 (0: "
                             f"off), got {self.drloc!r}")
        if isinstance(self.guide, bool) or not isinstance(self.guide, (int, float)) or not self.guide >= 0:
            raise ValueError(f"ViT guide is the weight of the locality guidance loss: a number >= 0 (0: off), got "
                             f"{self.guide!r}")
        if not isinstance(self.distill_head, bool):
            raise ValueError(f"ViT distill_head must be True or False (DeiT's distillation head on or off), got "
                             f"{self.distill_head!r}")
        if self.distill_head and self.pool != "mean":
            raise ValueError("ViT distill_head=True reads the CLS token's output, which pool='cls' gives to the class "
                             "head: use pool='mean' with it, or distill_head=False")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size)**2

    @property
    def guide_layer(self) -> int:
        """How many blocks the guided tokens have passed: half of them (the teacher's map is a middle layer's too)."""
        return max(self.num_layers // 2, 1)

    def encoder_signature(self) -> Dict[str, Any]:
        """The fields that define the encoder's function (what must match to transfer an encoder): everything but the
        regularisation rates, `pool` (how the head reads the tokens: a finetuning choice), `drloc`, `distill_head`
        and `guide` (heads beside the classifier's). `norm_first` changes no weight shape but changes what the weights
        compute."""
        return {k: v for k, v in asdict(self).items() if k not in ("drop", "drop_path", "pool", "drloc",
                                                                   "distill_head", "guide")}


def conv_stem(num_channels: int, em_dim: int, patch_size: int) -> nn.Sequential:
    """CCT's convolutional tokenizer: log2(patch_size) stages of Conv2d 3x3 (stride 1, no bias), ReLU, MaxPool 3x3 of
    stride 2, so an image of side S becomes (S / patch_size)^2 tokens of em_dim channels, as the patch stem gives.

    The stages before the last have em_dim / 4 channels: CCT's 64 (`in_planes`) at its width, and this project's,
    of 256. CCT keeps 64 at every width; a quarter of it keeps a narrow ViT's stem narrow too (at width 64, 64
    channels made a CPU training step twice as slow as the patch stem's, 16 about as fast)."""
    stages = patch_size.bit_length() - 1
    widths = [num_channels] + [max(em_dim // 4, 1)] * (stages - 1) + [em_dim]
    layers = []
    for c_in, c_out in zip(widths, widths[1:]):
        conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight)  # CCT's initialisation of the tokenizer
        layers += [conv, nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]  # [B, c_out, H / 2, W / 2]
    return nn.Sequential(*layers)


def lsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T) v with the diagonal masked out (Locality Self-Attention's mask; q carries the learnt scale).

    q, k, v: [B, heads, L, head size] -> [B, heads, L, head size]. Scaled-dot-product attention with a boolean mask,
    which keeps it off the flash kernel. Of the other kernels measured for the mask (docs/performance.md), attention
    written out trained slower, and FlexAttention's fused kernel (the mask as its `score_mod`) evaluated faster but its
    compiled passes gave wrong outputs in some processes, so neither is used."""
    n = q.shape[-2]
    others = ~torch.eye(n, dtype=torch.bool, device=q.device)  # [L, L], True where attention is allowed
    return F.scaled_dot_product_attention(q, k, v, attn_mask=others, dropout_p=dropout_p, scale=1.0)


class ViTEmbeddings(nn.Module):
    """Patch embedding (Conv2d with kernel = stride = patch), a learnable CLS token and position embedding.

    With `spt`, Shifted Patch Tokenization (Lee et al. 2021) feeds the Conv2d: the image and four copies shifted by
    half a patch towards each corner (zero padded) as 5x the channels, each patch layer-normalised over its
    5 * C * patch * patch values. That is Lee et al.'s patch flatten -> LayerNorm -> Linear, with the Linear as the
    Conv2d (no bias: the position embedding adds a learnt vector to every token anyway).

    With `stem="conv"`, `conv_stem` (CCT's tokenizer) makes the tokens instead of the patch Conv2d."""
    def __init__(self, image_size: int = 224, patch_size: int = 16, num_channels: int = 3, em_dim: int = 768,
                 drop: float = 0.1, spt: bool = False, stem: str = "patch") -> None:
        super().__init__()
        in_channels = 5 * num_channels if spt else num_channels
        self.patch_size = patch_size
        self.patch_norm = nn.LayerNorm([in_channels, patch_size, patch_size]) if spt else None
        # exactly one of the two makes the tokens; the other is None, so the state_dict holds only the one in use
        self.conv_stem = conv_stem(num_channels, em_dim, patch_size) if stem == "conv" else None
        self.patch_embedding = None if stem == "conv" else nn.Conv2d(in_channels, em_dim, kernel_size=patch_size,
                                                                     stride=patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, (image_size // patch_size)**2 + 1, em_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, em_dim))
        self.dropout = nn.Dropout(drop)
        # The apphub leaves both at zero; a small random start breaks the symmetry between positions from step one.
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def _shifted_patches(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 5C, H, W]
        p = self.patch_size
        s = p // 2
        b, _, h, w = x.shape
        padded = F.pad(x, (s, s, s, s))  # [B, C, H + 2s, W + 2s]; zero is the mean colour after Normalize
        # Lee et al.'s PatchShifting, four diagonal shifts: the image moves s down-right, down-left, up-right, up-left
        shifted = [padded[:, :, dy:dy + h, dx:dx + w] for dy, dx in ((0, 0), (0, 2 * s), (2 * s, 0), (2 * s, 2 * s))]
        x = torch.cat([x, *shifted], dim=1)  # [B, 5C, H, W]
        c = x.shape[1]
        patches = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)  # [B, H/p, W/p, 5C, p, p]
        patches = self.patch_norm(patches)  # over each patch's 5C * p * p values
        return patches.permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)  # back to [B, 5C, H, W] for the Conv2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.patch_norm is not None:
            x = self._shifted_patches(x)  # [B, 5C, H, W]
        x = self.patch_embedding(x) if self.conv_stem is None else self.conv_stem(x)  # [B, em_dim, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # NCHW -> NLC: [B, num_patches, em_dim]
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1)  # [B, num_patches + 1, em_dim]
        return self.dropout(x + self.position_embedding)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016), as timm's `DropPath`."""
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class EncoderBlock(nn.Module):
    """One transformer encoder layer, batch-first.

    The sub-module names are those of `torch.nn.TransformerEncoderLayer` (self_attn, linear1, linear2, norm1, norm2),
    which the apphub model uses, so checkpoints keep their keys. Written out (instead of using that class) so the block
    can carry stochastic depth and stays one readable, compile-friendly function.
    """
    def __init__(self, em_dim: int, num_heads: int, ff_dim: int, drop: float, norm_first: bool,
                 drop_path: float = 0.0, lsa: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(em_dim, num_heads, dropout=drop, batch_first=True)
        # LSA's temperature: one learnt scale per head, starting at the usual 1 / sqrt(head size) (Lee et al. 2021)
        self.attn_scale = nn.Parameter(torch.full((num_heads, ), (em_dim // num_heads)**-0.5)) if lsa else None
        self.linear1 = nn.Linear(em_dim, ff_dim)
        self.linear2 = nn.Linear(ff_dim, em_dim)
        self.norm1 = nn.LayerNorm(em_dim, eps=1e-5)  # torch's TransformerEncoderLayer default eps
        self.norm2 = nn.LayerNorm(em_dim, eps=1e-5)
        self.dropout = nn.Dropout(drop)  # inside the MLP, after the activation
        self.dropout1 = nn.Dropout(drop)  # on the attention branch
        self.dropout2 = nn.Dropout(drop)  # on the MLP branch
        self.drop_path = DropPath(drop_path)
        self.norm_first = norm_first

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        # The weights live in `self_attn` (an nn.MultiheadAttention, for the checkpoint keys); the computation calls
        # scaled_dot_product_attention directly, which picks the flash / memory-efficient kernels and compiles cleanly.
        b, n, d = x.shape
        heads = self.self_attn.num_heads
        qkv = F.linear(x, self.self_attn.in_proj_weight, self.self_attn.in_proj_bias)  # [B, L, 3 * D]
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, L, D / heads]
        dropout_p = self.self_attn.dropout if self.training else 0.0
        if self.attn_scale is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # LSA: the learnt scale goes into q (in q's dtype, bf16 under autocast), the mask hides the diagonal
            q = q * self.attn_scale.to(q.dtype).view(1, heads, 1, 1)
            out = lsa_attention(q, k, v, dropout_p)
        out = out.transpose(1, 2).reshape(b, n, d)  # [B, heads, L, D / heads] -> [B, L, D]
        return self.dropout1(self.self_attn.out_proj(out))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, em_dim] -> [B, L, em_dim]
        if self.norm_first:
            x = x + self.drop_path(self._attention(self.norm1(x)))
            return x + self.drop_path(self._mlp(self.norm2(x)))
        x = self.norm1(x + self.drop_path(self._attention(x)))
        return self.norm2(x + self.drop_path(self._mlp(x)))


class TransformerStack(nn.Module):
    """A stack of `EncoderBlock`s under the attribute `layers`, as `torch.nn.TransformerEncoder` names it."""
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        # Stochastic depth grows linearly with depth, as in timm and DeiT.
        rates = [cfg.drop_path * i / max(cfg.num_layers - 1, 1) for i in range(cfg.num_layers)]
        self.layers = nn.ModuleList([
            EncoderBlock(cfg.em_dim, cfg.num_heads, cfg.ff_dim, cfg.drop, cfg.norm_first, rate, cfg.lsa)
            for rate in rates
        ])

    def forward(self, x: torch.Tensor, tap: Optional[int] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """[B, L, em_dim] -> the last block's output [B, L, em_dim]; with `tap`, also the output of the first `tap`
        blocks, (last, tapped)."""
        tapped = x
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i + 1 == tap:
                tapped = x
        return x if tap is None else (x, tapped)


class ViTEncoder(nn.Module):
    """Embeddings, transformer layers and a final LayerNorm; the output is the CLS token's embedding [B, em_dim]."""
    def __init__(self, num_layers: int = 12, image_size: int = 224, patch_size: int = 16, num_channels: int = 3,
                 em_dim: int = 768, drop: float = 0.1, num_heads: int = 12, ff_dim: int = 3072,
                 norm_first: bool = False, drop_path: float = 0.0, pool: str = "cls", lsa: bool = False,
                 spt: bool = False, stem: str = "patch") -> None:
        super().__init__()
        self.config = ViTConfig(num_layers=num_layers, image_size=image_size, patch_size=patch_size,
                                num_channels=num_channels, em_dim=em_dim, num_heads=num_heads, ff_dim=ff_dim, drop=drop,
                                norm_first=norm_first, drop_path=drop_path, pool=pool, lsa=lsa, spt=spt, stem=stem)
        self.embedding = ViTEmbeddings(image_size, patch_size, num_channels, em_dim, drop, spt, stem)
        self.encoder = TransformerStack(self.config)
        self.layernorm = nn.LayerNorm(em_dim, eps=1e-6)

    def forward_tokens(self, x: torch.Tensor,
                       tap: Optional[int] = None) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """[B, C, H, W] -> the last layer's output [B, num_patches + 1, em_dim], CLS first; with `tap`, also the
        output after `tap` blocks (TransformerStack.forward)."""
        return self.encoder(self.embedding(x), tap)

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # [B, num_patches + 1, em_dim] -> [B, em_dim]
        # the CLS token, or the average of the patch tokens (the CLS token stays in the sequence either way)
        return self.layernorm(x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, em_dim]
        return self.pool(self.forward_tokens(x))


class ViTModel(nn.Module):
    """`ViTEncoder` followed by a linear head. Arguments and defaults as the apphub's `ViTModel` (ViT-B/16 sizes)."""
    # state_dict prefixes of what only training uses (the relative-localization head, the guidance's map): a saved model
    # loads for eval and further training whether it has them or not (apphub_vit.common.load_weights)
    training_only: Tuple[str, ...] = ("relative_loc.", "guide_head.")
    # state_dict prefixes of optional heads that eval uses, and the field that adds each: a file that does not fit
    # because it was saved with or without one is told which value of that field it needs
    optional_heads: Dict[str, str] = {"distill_classifier.": "distill_head"}

    def __init__(self, num_classes: int, num_layers: int = 12, image_size: int = 224, patch_size: int = 16,
                 num_channels: int = 3, em_dim: int = 768, drop: float = 0.1, num_heads: int = 12, ff_dim: int = 3072,
                 norm_first: bool = False, drop_path: float = 0.0, pool: str = "cls", lsa: bool = False,
                 spt: bool = False, stem: str = "patch", drloc: float = 0.0, distill_head: bool = False,
                 guide: float = 0.0) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"ViTModel num_classes must be a positive integer, got {num_classes!r}")
        self.vit_encoder = ViTEncoder(num_layers=num_layers, image_size=image_size, patch_size=patch_size,
                                      num_channels=num_channels, em_dim=em_dim, drop=drop, num_heads=num_heads,
                                      ff_dim=ff_dim, norm_first=norm_first, drop_path=drop_path, pool=pool, lsa=lsa,
                                      spt=spt, stem=stem)
        self.linear_classifier = nn.Linear(em_dim, num_classes)
        # the encoder's fields and this model's own (checked there)
        self._config = replace(self.vit_encoder.config, drloc=drloc, distill_head=distill_head, guide=guide)
        self.relative_loc = DenseRelativeLoc(em_dim, image_size // patch_size) if self._config.drloc > 0 else None
        self.distill_classifier = nn.Linear(em_dim, num_classes) if distill_head else None
        # locality guidance: the middle block's tokens in the teacher's channels (its own norm: pre-norm blocks leave
        # the residual stream unnormalised)
        self.guide_head = nn.Sequential(nn.LayerNorm(em_dim), nn.Linear(em_dim, MAP_CHANNELS)) if guide > 0 else None

    @classmethod
    def from_config(cls, num_classes: int, cfg: ViTConfig) -> "ViTModel":
        return cls(num_classes, **asdict(cfg))

    @property
    def config(self) -> ViTConfig:
        return self._config

    def no_weight_decay(self) -> Set[str]:
        """Names of the parameters that timm and DeiT leave out of weight decay: biases, every LayerNorm's scale and
        shift (SPT's patch norm too), the position embedding, the CLS token and LSA's temperatures. Decay pulls each
        towards 0, which for these is not a simpler model but a different one (a norm that scales its input down, an
        attention that flattens)."""
        names = {f"{m}.{n}" if m else n for m, module in self.named_modules() if isinstance(module, nn.LayerNorm)
                 for n, _ in module.named_parameters(recurse=False)}
        names |= {n for n, _ in self.named_parameters()
                  if n.endswith(("bias", "position_embedding", "cls_token", "attn_scale"))}
        return names

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit_encoder(x)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """[B, C, H, W] -> [B, num_classes] logits. In training, with `distill_head`, `drloc` and / or `guide`, a
        tuple: (logits, the distillation head's logits, drloc * its loss, the guided tokens [B, num_patches,
        MAP_CHANNELS]), each where the model has it."""
        guided = None
        if self.guide_head is not None and self.training:
            tokens, middle = self.vit_encoder.forward_tokens(x, self._config.guide_layer)  # 2 x [B, N + 1, em_dim]
            guided = self.guide_head(middle[:, 1:])  # [B, num_patches, MAP_CHANNELS], row-major grid
        else:
            tokens = self.vit_encoder.forward_tokens(x)  # [B, num_patches + 1, em_dim]
        logits = self.linear_classifier(self.vit_encoder.pool(tokens))  # [B, num_classes]
        outputs = [logits]
        if self.distill_classifier is not None:
            distill = self.distill_classifier(self.vit_encoder.layernorm(tokens[:, 0]))  # [B, num_classes], CLS token
            if not self.training:
                return (logits + distill) / 2  # DeiT's prediction: the mean of the two heads
            outputs.append(distill)
        if self.relative_loc is not None and self.training:
            outputs.append(self._config.drloc * self.relative_loc(tokens[:, 1:]))
        if guided is not None:
            outputs.append(guided)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
