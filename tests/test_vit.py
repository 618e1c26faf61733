"""networks/vit.py: shapes, gradients, configuration errors, and checkpoint compatibility with FastEstimator's
apphub."""
import pytest
import torch
import torch.nn as nn

from networks.vit import ViTConfig, ViTModel

TINY = dict(num_layers=2, image_size=32, patch_size=8, num_channels=3, em_dim=32, num_heads=4, ff_dim=64)


class ApphubViT(nn.Module):
    """FastEstimator apphub `vit_torch.py`'s model, rebuilt here from torch's own layers (sequence-first, post-norm),
    as the reference our parameter names and outputs must match."""
    def __init__(self, num_classes, num_layers, image_size, patch_size, num_channels, em_dim, num_heads, ff_dim):
        super().__init__()
        self.vit_encoder = nn.Module()
        emb = nn.Module()
        emb.patch_embedding = nn.Conv2d(num_channels, em_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        emb.position_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size)**2 + 1, em_dim))
        emb.cls_token = nn.Parameter(torch.randn(1, 1, em_dim))
        emb.dropout = nn.Dropout(0.1)
        self.vit_encoder.embedding = emb
        layer = nn.TransformerEncoderLayer(em_dim, nhead=num_heads, dim_feedforward=ff_dim, activation="gelu")
        self.vit_encoder.encoder = nn.TransformerEncoder(layer, num_layers=num_layers, enable_nested_tensor=False)
        self.vit_encoder.layernorm = nn.LayerNorm(em_dim, eps=1e-6)
        self.linear_classifier = nn.Linear(em_dim, num_classes)

    def forward(self, x):
        emb = self.vit_encoder.embedding
        x = emb.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([emb.cls_token.expand(x.size(0), -1, -1), x], dim=1) + emb.position_embedding
        x = self.vit_encoder.encoder(x.transpose(0, 1))  # sequence-first, as the apphub
        return self.linear_classifier(self.vit_encoder.layernorm(x[0]))


@pytest.mark.parametrize("norm_first,drop_path,lsa,spt,stem", [
    (False, 0.0, False, False, "patch"), (True, 0.0, False, False, "patch"), (True, 0.2, False, False, "patch"),
    (True, 0.0, True, False, "patch"), (True, 0.0, False, True, "patch"), (True, 0.0, True, True, "patch"),
    (True, 0.0, True, False, "conv"), (False, 0.0, False, False, "conv")])
def test_shapes_finite_and_every_parameter_gets_a_gradient(norm_first, drop_path, lsa, spt, stem):
    torch.manual_seed(0)
    model = ViTModel(num_classes=10, norm_first=norm_first, drop_path=drop_path, lsa=lsa, spt=spt, stem=stem, **TINY)
    x = torch.randn(3, 3, 32, 32)
    assert model.forward_features(x).shape == (3, 32)
    logits = model(x)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_state_dict_keys_are_the_apphub_models():
    ours = ViTModel(num_classes=100, **TINY).state_dict()
    ref = ApphubViT(100, 2, 32, 8, 3, 32, 4, 64).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    # Pinned names for this small config, so a rename is caught even if the reference were changed with it.
    layer0 = [k for k in ours if k.startswith("vit_encoder.encoder.layers.0.")]
    assert sorted(layer0) == sorted(f"vit_encoder.encoder.layers.0.{n}" for n in (
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm1.weight", "norm1.bias",
        "norm2.weight", "norm2.bias"))
    assert [k for k in ours if "layers" not in k] == [
        "vit_encoder.embedding.position_embedding", "vit_encoder.embedding.cls_token",
        "vit_encoder.embedding.patch_embedding.weight", "vit_encoder.layernorm.weight", "vit_encoder.layernorm.bias",
        "linear_classifier.weight", "linear_classifier.bias"
    ]


def test_apphub_checkpoint_loads_and_computes_the_same_function():
    torch.manual_seed(0)
    ref = ApphubViT(10, 2, 32, 8, 3, 32, 4, 64).eval()
    ours = ViTModel(num_classes=10, **TINY).eval()
    ours.load_state_dict(ref.state_dict())  # strict: every key present, no extra
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad,message", [
    (dict(image_size=30, patch_size=4), "not divisible by patch_size"),
    (dict(em_dim=30, num_heads=4), "not divisible by num_heads"),
    (dict(num_layers=0), "num_layers must be a positive integer"),
    (dict(drop=1.5), "drop must be in"),
    (dict(lsa="yes"), "lsa must be True or False"),
    (dict(spt=1), "spt must be True or False"),
    (dict(spt=True, patch_size=1), "spt shifts by half a patch, so it needs patch_size >= 2"),
    (dict(stem="convolution"), "stem must be 'patch' .* or 'conv'"),
    (dict(stem="conv", image_size=28, patch_size=7), "patch_size must be a power of 2 .* got 7"),
    (dict(stem="conv", spt=True), "use spt=False with stem='conv'"),
    (dict(drloc=-0.1), "drloc is the weight .* a number >= 0"),
    (dict(drloc=True), "drloc is the weight .* a number >= 0"),
])
def test_invalid_configurations_raise_clear_value_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        ViTModel(num_classes=10, **{**TINY, **bad})


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes"):
        ViTModel(num_classes=0, **TINY)


def test_default_config_is_the_apphub_size():
    model = ViTModel.from_config(100, ViTConfig())
    d, ff, layers = 256, 512, 6
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d  # attention, MLP, 2 norms
    embedding = 3 * d * 4 * 4 + (64 + 1) * d + d  # patch conv (no bias), position, CLS
    expected = embedding + layers * per_layer + 2 * d + (d * 100 + 100)  # + final norm + head
    assert sum(p.numel() for p in model.parameters()) == expected == 3_218_020  # the apphub's "3.2M"


def test_mean_pooling_reads_the_patch_tokens_and_keeps_the_state_dict():
    torch.manual_seed(0)
    cls_model = ViTModel(num_classes=10, norm_first=True, **TINY)
    mean_model = ViTModel(num_classes=10, norm_first=True, pool="mean", **TINY)
    mean_model.load_state_dict(cls_model.state_dict())  # same parameters: an encoder transfers either way
    cls_model.eval(), mean_model.eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = cls_model.vit_encoder.encoder(cls_model.vit_encoder.embedding(x))  # [B, 1 + patches, D]
    torch.testing.assert_close(mean_model.forward_features(x), mean_model.vit_encoder.layernorm(tokens[:, 1:].mean(1)))
    torch.testing.assert_close(cls_model.forward_features(x), cls_model.vit_encoder.layernorm(tokens[:, 0]))
    assert cls_model.config.encoder_signature() == mean_model.config.encoder_signature()  # a finetuning choice
    with pytest.raises(ValueError, match="pool must be 'cls'.*or 'mean'"):
        ViTModel(num_classes=10, pool="max", **TINY)


def lsa_reference(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Locality Self-Attention written out as Lee et al.'s `Attention` (aanna0701/SPT_LSA_ViT) computes it: scores
    times a learnt scale per head, the diagonal set to a large negative number, softmax, then the values."""
    b, n, d = x.shape
    heads = block.self_attn.num_heads
    q, k, v = (x @ block.self_attn.in_proj_weight.T + block.self_attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D / heads]
    dots = (q @ k.transpose(-1, -2)) * block.attn_scale.view(1, heads, 1, 1)
    dots[:, :, torch.arange(n), torch.arange(n)] = -987654321.0
    out = (dots.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return block.self_attn.out_proj(out)


def test_lsa_computes_lee_et_al_attention_with_a_learnt_scale_per_head_and_no_attention_to_self():
    torch.manual_seed(0)
    model = ViTModel(num_classes=10, norm_first=True, lsa=True, **TINY).eval()
    block = model.vit_encoder.encoder.layers[0]
    head_size = TINY["em_dim"] // TINY["num_heads"]
    torch.testing.assert_close(block.attn_scale.detach(), torch.full((4, ), head_size**-0.5))  # starts as usual
    with torch.no_grad():
        block.attn_scale.copy_(torch.tensor([0.1, 0.5, 1.0, 2.0]))  # a different temperature in every head
    x = torch.randn(2, 17, TINY["em_dim"])  # [B, 1 + 16 patches, D]
    with torch.no_grad():
        torch.testing.assert_close(block._attention(x), lsa_reference(block, x), rtol=1e-4, atol=1e-5)
        # standard attention (a token attends to itself too, fixed scale) gives a different answer on the same weights
        plain = ViTModel(num_classes=10, norm_first=True, **TINY).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        assert not torch.allclose(plain.vit_encoder.encoder.layers[0]._attention(x), block._attention(x), atol=1e-3)


def test_lsa_adds_one_scale_per_block_to_the_state_dict_and_to_the_encoder_signature():
    plain = ViTModel(num_classes=10, **TINY)
    lsa = ViTModel(num_classes=10, lsa=True, **TINY)
    extra = set(lsa.state_dict()) - set(plain.state_dict())
    assert extra == {f"vit_encoder.encoder.layers.{i}.attn_scale" for i in range(TINY["num_layers"])}
    assert set(plain.state_dict()) <= set(lsa.state_dict())
    assert plain.config.encoder_signature() != lsa.config.encoder_signature()  # an LSA encoder is another function
    assert sum(p.numel() for p in lsa.parameters()) == sum(p.numel() for p in plain.parameters()) + 2 * 4


def test_lsa_and_spt_run_under_bf16_autocast():
    torch.manual_seed(0)
    model = ViTModel(num_classes=10, norm_first=True, lsa=True, spt=True, **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits.float()).all()


def spt_reference(embedding: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Shifted Patch Tokenization as Lee et al.'s `ShiftedPatchTokenization` computes it (aanna0701/SPT_LSA_ViT):
    pad by half a patch, the four corner slices, concatenate, flatten each patch into a vector, LayerNorm, Linear.
    The vector is flattened in our Conv2d's (channel, row, column) order so the same weights serve both."""
    p = embedding.patch_size
    s = p // 2
    pad = torch.nn.functional.pad(x, (s, s, s, s))
    x5 = torch.cat([x, pad[:, :, :-2 * s, :-2 * s], pad[:, :, :-2 * s, 2 * s:], pad[:, :, 2 * s:, :-2 * s],
                    pad[:, :, 2 * s:, 2 * s:]], dim=1)  # Lee et al.'s x_lu, x_ru, x_lb, x_rb
    b, c, h, w = x5.shape
    vectors = torch.stack([x5[:, :, i:i + p, j:j + p].reshape(b, -1) for i in range(0, h, p) for j in range(0, w, p)],
                          dim=1)  # [B, patches, 5C * p * p], row-major over the patch grid
    norm = embedding.patch_norm
    vectors = torch.nn.functional.layer_norm(vectors, vectors.shape[-1:], norm.weight.flatten(), norm.bias.flatten(),
                                             norm.eps)
    return vectors @ embedding.patch_embedding.weight.flatten(1).T  # [B, patches, em_dim]


def test_spt_embeds_lee_et_al_shifted_patches_with_the_conv2d():
    torch.manual_seed(0)
    model = ViTModel(num_classes=10, spt=True, **dict(TINY, patch_size=4)).eval()
    embedding = model.vit_encoder.embedding
    with torch.no_grad():  # a LayerNorm that is not the identity, so its place in the computation matters
        embedding.patch_norm.weight.uniform_(0.5, 1.5), embedding.patch_norm.bias.uniform_(-0.5, 0.5)
    assert embedding.patch_embedding.weight.shape == (32, 15, 4, 4)  # 5 x 3 channels
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = embedding(x)  # [B, 1 + 64, D]: CLS, patches, plus position embeddings
        expected = spt_reference(embedding, x) + embedding.position_embedding[:, 1:]
        torch.testing.assert_close(tokens[:, 1:], expected, rtol=1e-4, atol=1e-4)
        # the shifted copies matter: the same weights on the image alone, with zeros in their place, differ
        shifted_only = torch.cat([x, torch.zeros(2, 12, 32, 32)], 1)
        embedding.patch_norm = None  # the plain path, fed the 15 channels directly
        assert not torch.allclose(embedding(shifted_only)[:, 1:], expected, atol=1e-2)


def test_spt_changes_the_embedding_and_the_encoder_signature_but_not_the_blocks():
    plain = ViTModel(num_classes=10, **TINY)
    spt = ViTModel(num_classes=10, spt=True, **TINY)
    extra = set(spt.state_dict()) - set(plain.state_dict())
    assert extra == {"vit_encoder.embedding.patch_norm.weight", "vit_encoder.embedding.patch_norm.bias"}
    assert spt.state_dict()["vit_encoder.embedding.patch_embedding.weight"].shape == (32, 15, 8, 8)
    assert plain.config.encoder_signature() != spt.config.encoder_signature()


def test_no_weight_decay_names_biases_norms_embeddings_and_lsa_scales_but_no_weight_matrix():
    model = ViTModel(10, **TINY, norm_first=True, lsa=True, spt=True)
    named = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip <= set(named)
    emb = "vit_encoder.embedding."
    expected = {n for n, p in named.items() if p.ndim <= 1}  # biases, LayerNorms, LSA's attn_scale
    expected |= {emb + "position_embedding", emb + "cls_token", emb + "patch_norm.weight", emb + "patch_norm.bias"}
    assert skip == expected
    assert any(n.endswith("attn_scale") for n in skip) and any(n.endswith("norm1.weight") for n in skip)
    matrices = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert not any(n.rsplit(".", 1)[0] in matrices and n.endswith("weight") for n in skip)
    assert not any(n.endswith("in_proj_weight") for n in skip)


class CCTTokenizer(nn.Module):
    """Compact Convolutional Transformers' `Tokenizer` (SHI-Labs/Compact-Transformers, `src/utils/tokenizer.py`) with
    the arguments its CCT models pass (kernel 3, stride 1, padding 1, max-pool 3 / 2 / 1, ReLU, no bias; `in_planes`
    64 there, em_dim / 4 in `conv_stem`): the reference `conv_stem` must compute."""
    def __init__(self, n_conv_layers, n_input_channels, n_output_channels, in_planes=64):
        super().__init__()
        n_filter_list = [n_input_channels] + [in_planes for _ in range(n_conv_layers - 1)] + [n_output_channels]
        self.conv_layers = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(n_filter_list[i], n_filter_list[i + 1], kernel_size=(3, 3), stride=(1, 1),
                                    padding=(1, 1), bias=False), nn.ReLU(),
                          nn.MaxPool2d(kernel_size=3, stride=2, padding=1)) for i in range(n_conv_layers)])
        self.flattener = nn.Flatten(2, 3)

    def forward(self, x):
        return self.flattener(self.conv_layers(x)).transpose(-2, -1)


@pytest.mark.parametrize("patch_size,stages", [(2, 1), (4, 2), (8, 3)])
def test_conv_stem_computes_cct_tokenizer_with_one_stage_per_halving(patch_size, stages):
    torch.manual_seed(0)
    model = ViTModel(num_classes=10, stem="conv", **dict(TINY, patch_size=patch_size)).eval()
    embedding = model.vit_encoder.embedding
    reference = CCTTokenizer(stages, 3, TINY["em_dim"], in_planes=TINY["em_dim"] // 4).eval()
    convs = [m for m in embedding.conv_stem if isinstance(m, nn.Conv2d)]
    assert len(convs) == stages
    with torch.no_grad():
        for ours, theirs in zip(convs, [stage[0] for stage in reference.conv_layers]):
            theirs.weight.copy_(ours.weight)  # the same weights (shapes must agree for the copy)
        x = torch.randn(2, 3, 32, 32)
        tokens = embedding(x)  # [B, 1 + (32 / p)^2, D]: CLS, tokens, plus position embeddings
        expected = reference(x) + embedding.position_embedding[:, 1:]
    assert tokens.shape == (2, 1 + (32 // patch_size)**2, TINY["em_dim"])
    torch.testing.assert_close(tokens[:, 1:], expected, rtol=1e-5, atol=1e-5)


def test_conv_stem_replaces_the_patch_conv_in_the_state_dict_and_the_encoder_signature():
    plain = ViTModel(num_classes=10, **dict(TINY, patch_size=4))
    conv = ViTModel(num_classes=10, stem="conv", **dict(TINY, patch_size=4))
    assert set(plain.state_dict()) - set(conv.state_dict()) == {"vit_encoder.embedding.patch_embedding.weight"}
    assert set(conv.state_dict()) - set(plain.state_dict()) == {"vit_encoder.embedding.conv_stem.0.weight",
                                                                "vit_encoder.embedding.conv_stem.3.weight"}
    assert conv.state_dict()["vit_encoder.embedding.conv_stem.0.weight"].shape == (8, 3, 3, 3)  # em_dim / 4
    assert conv.state_dict()["vit_encoder.embedding.conv_stem.3.weight"].shape == (32, 8, 3, 3)
    # at the recipe's width, 256: CCT's own 64 planes, 3.33M parameters with the recipe's 6 x 256 blocks
    full = ViTModel(num_classes=10, stem="conv", num_layers=6, image_size=32, patch_size=4, em_dim=256, num_heads=8,
                    ff_dim=512, norm_first=True, pool="mean", lsa=True, drop=0.0)
    assert full.vit_encoder.embedding.conv_stem[0].weight.shape == (64, 3, 3, 3)
    assert sum(p.numel() for p in full.parameters()) == 3_331_834
    assert plain.config.encoder_signature() != conv.config.encoder_signature()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipes' precision on a GPU
        assert torch.isfinite(conv(torch.randn(2, 3, 32, 32)).float()).all()


class _ReadOffsets(nn.Module):
    """A perfect pair predictor for tokens that carry their (row, column) in channels 0-1: |a - b| per axis."""
    def __init__(self, em_dim: int, order=(0, 1), signed: bool = False) -> None:
        super().__init__()
        self.em_dim, self.order, self.signed = em_dim, list(order), signed

    def forward(self, pair: torch.Tensor) -> torch.Tensor:  # [B, P, 2 * em_dim] -> [B, P, 2]
        delta = pair[..., self.order] - pair[..., [self.em_dim + i for i in self.order]]
        return delta if self.signed else delta.abs()


def test_relative_localization_regresses_each_pairs_offset_on_the_token_grid():
    """Liu et al. 2021's targets, as their training script sets them (absolute offsets): for two tokens of a side x
    side grid (row-major), how many rows and columns apart they are. A predictor that reads each token's position
    from its embedding has zero loss; one that mixes up rows and columns, or keeps the sign, does not."""
    from networks.drloc import DenseRelativeLoc
    torch.manual_seed(0)
    side = 5
    head = DenseRelativeLoc(em_dim=4, side=side, pairs=50)
    rows, cols = torch.arange(side * side) // side, torch.arange(side * side) % side
    tokens = torch.stack([rows, cols, torch.zeros_like(rows), torch.zeros_like(rows)], -1).float().expand(3, -1, -1)
    head.mlp = _ReadOffsets(4)
    assert head(tokens).item() == 0.0
    head.mlp = _ReadOffsets(4, order=(1, 0))  # columns predicted as rows
    assert head(tokens).item() > 0.5
    head.mlp = _ReadOffsets(4, signed=True)
    assert head(tokens).item() > 0.5
    with pytest.raises(ValueError, match="expects 5 x 5 = 25 patch tokens, got 24"):
        head(tokens[:, 1:])


def test_relative_localization_adds_a_training_loss_and_leaves_eval_and_the_encoder_alone():
    torch.manual_seed(0)
    plain, aux = ViTModel(num_classes=10, **TINY), ViTModel(num_classes=10, drloc=0.5, **TINY)
    assert plain.relative_loc is None and aux.config.drloc == 0.5
    assert plain.config.encoder_signature() == aux.config.encoder_signature()
    assert all(k.startswith("relative_loc.") for k in aux.state_dict().keys() - plain.state_dict().keys())
    assert plain.state_dict().keys() <= aux.state_dict().keys()
    x = torch.randn(3, 3, 32, 32)
    logits, loss = aux.train()(x)
    assert logits.shape == (3, 10) and loss.shape == () and loss.item() > 0
    (logits.sum() + loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aux.parameters())
    assert all(p.grad.abs().sum() > 0 for p in aux.relative_loc.parameters())
    aux.eval()
    with torch.no_grad():  # eval: the logits alone, as the model without the head computes them
        torch.testing.assert_close(aux(x), aux.linear_classifier(aux.forward_features(x)))
    # the apphub-size conv-stem model stays within 3.5M parameters with the head
    big = ViTModel.from_config(10, ViTConfig(num_layers=6, em_dim=256, num_heads=8, ff_dim=512, patch_size=4,
                                             stem="conv", lsa=True, norm_first=True, pool="mean", drloc=0.1))
    assert sum(p.numel() for p in big.parameters()) <= 3_500_000


def test_distillation_head_reads_the_cls_token_trains_apart_and_predicts_with_the_mean_of_both_heads():
    torch.manual_seed(0)
    plain = ViTModel(num_classes=10, pool="mean", **TINY)
    both = ViTModel(num_classes=10, pool="mean", distill_head=True, drloc=0.5, **TINY)
    assert plain.distill_classifier is None and both.config.distill_head
    assert plain.config.encoder_signature() == both.config.encoder_signature()  # the encoder is the same
    assert both.state_dict().keys() - plain.state_dict().keys() == {
        "distill_classifier.weight", "distill_classifier.bias", *(k for k in both.state_dict() if "relative_loc" in k)}
    x = torch.randn(3, 3, 32, 32)
    logits, distill, loss = both.train()(x)  # training: both heads apart, then the auxiliary loss
    assert logits.shape == distill.shape == (3, 10) and loss.shape == ()
    distill.sum().backward()  # the distillation head's loss reaches the encoder, but not the class head
    assert all(p.grad is None for p in both.linear_classifier.parameters())
    assert both.vit_encoder.embedding.cls_token.grad.abs().sum() > 0
    both.zero_grad(set_to_none=True)
    logits, distill, loss = both(x)
    (logits.sum() + distill.sum() + loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in both.parameters())
    both.eval()
    with torch.no_grad():  # eval: the mean of the class head (mean of the patch tokens) and the CLS token's head
        tokens = both.vit_encoder.forward_tokens(x)
        enc = both.vit_encoder
        want = (both.linear_classifier(enc.layernorm(tokens[:, 1:].mean(1)))
                + both.distill_classifier(enc.layernorm(tokens[:, 0]))) / 2
        torch.testing.assert_close(both(x), want)
    only = ViTModel(num_classes=10, pool="mean", distill_head=True, **TINY).train()
    assert len(only(x)) == 2  # without drloc: (logits, distill logits)
    with pytest.raises(ValueError, match="distill_head=True reads the CLS token"):
        ViTModel(num_classes=10, pool="cls", distill_head=True, **TINY)
    with pytest.raises(ValueError, match="distill_head must be True or False"):
        ViTConfig(pool="mean", distill_head=1)
