"""apphub_vit/pretrain.py and finetune.py: the command line, the Python API, weight transfer and every bad input."""
import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from fastestimator.trace.adapt import LRScheduler
from fastestimator.trace.metric import Accuracy

from apphub_vit import finetune as finetune_app
from apphub_vit import pretrain as pretrain_app
from apphub_vit.encoder_io import ENCODER_FILE, EncoderMismatchError, load_encoder_state
from apphub_vit.prediction_grid import GRID_FILE
from apphub_vit.recipes import VIT_RECIPES
from apphub_vit.records import RECORD_FILE, read_record
from apphub_vit.teacher import TEACHER_FILE, DistillTargets, LocalityGuidance, TeacherLabels
from apphub_vit.training import MixLosses, SmoothLabels
from networks.vit import ViTConfig, ViTModel
from tests.conftest import REPO, TINY_RUN, TINY_SHAPE, TINY_VIT, cli, cli_env, fastestimator_cmd, shared_path

CLI_TINY = ["--epochs", "1", "--batch_size", "16", "--train_steps_per_epoch", "3", "--eval_steps_per_epoch", "2",
            "--num_process", "0", "--synthetic_size", "[256,64]", "--num_layers", "2", "--em_dim", "32", "--num_heads",
            "2", "--ff_dim", "64", "--patch_size", "8", "--distill", "0"]  # no teacher (conftest.TINY_VIT)


def _run_cli(args, cwd):
    """`fastestimator train ARGS` (forked from one process that imported everything once: conftest.cli; the test of an
    unknown option below runs the console script in a new interpreter, as users do)."""
    out = cli(["train"] + args, cwd)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretraining run shared by the tests below: (returned model, save_dir)."""
    save_dir = tmp_path_factory.mktemp("pretrain")
    model = pretrain_app.pretrain(dataset="synthetic", save_dir=str(save_dir), **TINY_RUN, **TINY_VIT)
    return model, save_dir


def test_command_line_pretrain_then_finetune(tmp_path):
    out = _run_cli([str(REPO / "apphub_vit" / "pretrain.py"), "--dataset", "synthetic", "--save_dir",
                    str(tmp_path / "pre")] + CLI_TINY, cwd=tmp_path)
    assert "FastEstimator-Finish" in out
    encoder = tmp_path / "pre" / ENCODER_FILE
    assert encoder.is_file() and (tmp_path / "pre" / "vit_pretrain_best_accuracy.pt").is_file()
    out = _run_cli([str(REPO / "apphub_vit" / "finetune.py"), "--dataset", "synthetic", "--save_dir",
                    str(tmp_path / "fine"), "--encoder_weights", str(encoder)] + CLI_TINY[:12], cwd=tmp_path)
    assert "FastEstimator-Finish" in out and (tmp_path / "fine" / "vit_finetune_best_accuracy.pt").is_file()


def test_pretrain_returns_the_trained_100_class_model_and_saves_its_encoder(pretrained):
    model, save_dir = pretrained
    assert isinstance(model, ViTModel) and model.linear_classifier.out_features == 100
    # the prediction grid and the run record of every app run
    assert (save_dir / GRID_FILE).read_bytes().startswith(b"\x89PNG")
    assert read_record(str(save_dir / RECORD_FILE))["dataset"] == "synthetic CIFAR-100"
    saved = load_encoder_state(str(save_dir / ENCODER_FILE))
    assert saved["config"]["em_dim"] == 32
    for key, value in model.vit_encoder.state_dict().items():
        assert torch.equal(saved["state_dict"][key], value.cpu()), key


@pytest.mark.parametrize("source", ["model", "file"])
def test_finetune_starts_from_identical_encoder_weights_with_a_10_class_head(pretrained, tmp_path, source):
    model, save_dir = pretrained
    weights = model if source == "model" else str(save_dir / ENCODER_FILE)
    estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), encoder_weights=weights,
                                           **TINY_RUN)
    fresh = estimator.model
    assert fresh.linear_classifier.out_features == 10
    assert fresh.config.em_dim == 32 and fresh.config.num_layers == 2  # read from the pretrained encoder
    theirs = model.vit_encoder.state_dict()
    for key, value in fresh.vit_encoder.state_dict().items():
        assert torch.equal(value.cpu(), theirs[key].cpu()), key


def test_finetune_from_model_trains_and_returns_it(pretrained, tmp_path):
    model, _ = pretrained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = finetune_app.finetune(model, dataset="synthetic", save_dir=str(tmp_path), **TINY_RUN)
    assert tuned is not model and tuned.linear_classifier.out_features == 10
    assert any(not torch.equal(v, tuned.vit_encoder.state_dict()[k[len("vit_encoder."):]])
               for k, v in before.items() if k.startswith("vit_encoder."))  # finetuning moved the encoder
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the pretrained model untouched


def test_finetune_from_scratch_is_explicit(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained encoder weights.*from_scratch"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), **TINY_RUN)
    with pytest.raises(ValueError, match="pick one"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True,
                                   encoder_weights="x.pt", **TINY_RUN)
    model = finetune_app.finetune(None, from_scratch=True, dataset="synthetic", save_dir=str(tmp_path), **TINY_RUN,
                                  **TINY_VIT)
    assert model.linear_classifier.out_features == 10


@pytest.mark.parametrize("change,named", [({"em_dim": 64}, "em_dim: pretrained 32 vs model 64"),
                                          ({"num_layers": 3}, "num_layers: pretrained 2 vs model 3"),
                                          ({"patch_size": 4}, "patch_size: pretrained 8 vs model 4"),
                                          ({"lsa": False}, "lsa: pretrained True vs model False"),
                                          ({"stem": "patch"}, "stem: pretrained conv vs model patch"),
                                          ({"stem": "patch", "spt": True}, "spt: pretrained False vs model True")])
def test_other_architecture_is_an_error_naming_the_mismatch(pretrained, tmp_path, change, named):
    _, save_dir = pretrained
    with pytest.raises(EncoderMismatchError, match=named):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path),
                                   encoder_weights=str(save_dir / ENCODER_FILE), **TINY_RUN, **change)
    assert not (tmp_path / RECORD_FILE).exists()


def test_conv_stem_lsa_encoder_transfers_as_such_and_old_encoder_files_load_without_them(pretrained, tmp_path):
    cl_model, save_dir = pretrained  # recipe "vit": the conv stem and LSA
    assert cl_model.config.lsa and cl_model.config.stem == "conv" and not cl_model.config.spt
    encoder = str(save_dir / ENCODER_FILE)
    config = load_encoder_state(encoder)["config"]
    assert config["lsa"] is True and config["stem"] == "conv"
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "fine"), encoder_weights=encoder,
                                     **TINY_RUN)  # lsa and the stem read from the file, as the sizes are
    assert est.model.config.lsa and est.model.config.stem == "conv"
    for i, layer in enumerate(est.model.vit_encoder.encoder.layers):
        assert torch.equal(layer.attn_scale, cl_model.vit_encoder.encoder.layers[i].attn_scale.cpu())
    for ours, theirs in zip(est.model.vit_encoder.embedding.conv_stem.parameters(),
                            cl_model.vit_encoder.embedding.conv_stem.parameters()):
        assert torch.equal(ours, theirs.cpu())
    # an encoder file written before the lsa / spt / stem options (by a plain ViT): none of them in its config. It
    # finetunes as the plain patch-stem ViT it is, although the default recipe now has the conv stem and LSA.
    plain = pretrain_app.pretrain(dataset="synthetic", save_dir=str(tmp_path / "plain"), lsa=False, stem="patch",
                                  **TINY_RUN, **TINY_VIT)
    saved = torch.load(tmp_path / "plain" / ENCODER_FILE, map_location="cpu", weights_only=False)
    del saved["config"]["lsa"], saved["config"]["spt"], saved["config"]["stem"]
    torch.save(saved, tmp_path / "old.pt")
    old = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "old"),
                                     encoder_weights=str(tmp_path / "old.pt"), **TINY_RUN)
    assert not old.model.config.lsa and not old.model.config.spt and old.model.config.stem == "patch"
    theirs = plain.vit_encoder.state_dict()
    assert all(torch.equal(v.cpu(), theirs[k].cpu()) for k, v in old.model.vit_encoder.state_dict().items())


def test_bare_state_dict_of_other_shape_names_the_tensors(pretrained, tmp_path):
    model, _ = pretrained
    other = ViTModel(10, num_layers=2, em_dim=48, num_heads=2, ff_dim=64, patch_size=8, image_size=32)
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)  # a whole-model checkpoint without our config: shapes are checked
    with pytest.raises(EncoderMismatchError, match="position_embedding: pretrained .*48.* vs model .*32"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "run"), encoder_weights=str(path),
                                   **TINY_RUN, **TINY_VIT)


def test_missing_and_garbage_weight_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), encoder_weights=str(tmp_path / "x.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(EncoderMismatchError, match="is not a file torch.save wrote"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), encoder_weights=str(junk))


def test_existing_weights_are_never_overwritten_without_asking(pretrained):
    _, save_dir = pretrained
    encoder = save_dir / ENCODER_FILE
    before = encoder.read_bytes()
    with pytest.raises(FileExistsError, match="not overwriting"):
        pretrain_app.get_estimator(dataset="synthetic", save_dir=str(save_dir), **TINY_RUN, **TINY_VIT)
    assert encoder.read_bytes() == before


def test_real_cifar10_from_data_dir_on_the_command_line(tmp_path):
    converter = shared_path("data", "cifar10", "to_batches.py")
    subprocess.run([sys.executable, str(converter), str(tmp_path)], check=True, capture_output=True, timeout=300)
    out = _run_cli([str(REPO / "apphub_vit" / "finetune.py"), "--data_dir", str(tmp_path), "--from_scratch", "True",
                    "--save_dir", str(tmp_path / "run")] + CLI_TINY, cwd=tmp_path)
    assert "FastEstimator-Eval" in out and "accuracy" in out


def test_recipe_pooling_defaults_and_old_encoder_files_keep_the_cls_head(pretrained, tmp_path):
    model, save_dir = pretrained
    assert model.config.pool == "mean"  # recipe "vit"
    apphub = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                        recipe="apphub", **TINY_RUN, **TINY_VIT)
    assert apphub.model.config.pool == "cls"
    # an encoder file written before the pool option: its config has no "pool" and its head read the CLS token
    saved = torch.load(save_dir / ENCODER_FILE, map_location="cpu", weights_only=False)
    del saved["config"]["pool"]
    torch.save(saved, tmp_path / "old.pt")
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"),
                                     encoder_weights=str(tmp_path / "old.pt"), **TINY_RUN)
    assert est.model.config.pool == "cls"
    chosen = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), pool="mean",
                                        encoder_weights=str(tmp_path / "old.pt"), **TINY_RUN)
    assert chosen.model.config.pool == "mean"


def test_augmentation_options_are_checked(tmp_path):
    for bad, match in ((dict(augment="randaugment"), "augment must be one of 'apphub', 'autoaugment'"),
                       (dict(mix_prob=2), r"mix_prob must be a number in \[0.0, 1.0\]"),
                       (dict(mix_prob=0.5, augment="apphub"), "mixes strongly augmented batches"),
                       (dict(device_augment=False), "use device_augment=True with it")):
        with pytest.raises(ValueError, match=match):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True, **bad,
                                       **TINY_RUN, **TINY_VIT)
    per_sample = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True,
                                            augment="apphub", device_augment=False, **TINY_RUN, **TINY_VIT)
    assert [type(op).__name__ for op in per_sample.pipeline.ops][:2] == ["Normalize", "PadIfNeeded"]


def _schedule(est, steps):
    return [next(t for t in est.traces if isinstance(t, LRScheduler)).lr_fn(step) for step in range(1, steps + 1)]


def test_the_defaults_are_the_best_measured_recipe(tmp_path):
    # the teacher for 1 epoch instead of 12 (a minute on a CPU): its weight and epochs are checked in the recipe
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True, teacher_epochs=1,
                                     **dict(TINY_RUN, batch_size=None))
    cfg, opt = est.model.config, est.model.optimizer
    assert (cfg.norm_first, cfg.pool, cfg.drop, cfg.drop_path, cfg.stem, cfg.spt, cfg.lsa) == (
        True, "mean", 0.0, 0.0, "conv", False, True)
    assert (cfg.num_layers, cfg.em_dim, cfg.num_heads, cfg.ff_dim, cfg.patch_size) == (6, 256, 8, 512, 4)  # apphub's
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 2e-3
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]  # the weight matrices only
    assert est.pipeline.data["train"][""].images_per_batch == 256
    assert [type(op).__name__ for op in est.network.ops[0].ops][:2] == ["ChannelTranspose", "AutoAugment"]
    assert [op.smoothing for op in est.network.ops if isinstance(op, SmoothLabels)] == [0.1]
    assert est.config["recipe"]["name"] == "vit" and est.config["overrides"] == {"epochs": 1, "teacher_epochs": 1}
    assert est.config["recipe"]["lr"] == 2e-3 and est.config["recipe"]["batch_size"] == 256
    # DeiT's hard-label distillation from a ResNet-9 teacher, weight 0.5, the teacher trained 12 epochs
    assert est.config["recipe"]["distill"] == 0.5 and VIT_RECIPES["vit"].teacher_epochs == 12
    # with DeiT's distillation head: the teacher's labels (unmixed) go to a head of their own, its loss weighted 0.5
    assert cfg.distill_head and est.model.distill_classifier is not None
    assert [op.smoothing for op in est.network.ops if isinstance(op, TeacherLabels)] == [0.1]
    assert not any(isinstance(op, DistillTargets) for op in est.network.ops)
    assert [op.weight for op in est.network.ops if isinstance(op, MixLosses)] == [0.5]
    # and Li et al.'s locality guidance from the same teacher: the third block's tokens imitate its map, weight 1
    assert cfg.guide == 1.0 and cfg.guide_layer == 3 and est.model.guide_head is not None
    assert [op.weight for op in est.network.ops if isinstance(op, LocalityGuidance)] == [1.0]
    assert est.config["teacher"]["epochs"] == 1 and (tmp_path / TEACHER_FILE).is_file()
    assert (VIT_RECIPES["vit"].ema, VIT_RECIPES["vit"].mix_prob) == (0.0, 0.0)  # both measured, neither won
    assert est.config["recipe"]["tta"] == "flip_translate" and [
        m.outputs for m in est.traces if isinstance(m, Accuracy)] == [["accuracy"], ["accuracy_no_tta"], [
            "accuracy_flip"]]  # the shifted views won their sweep; single images and flips alone recorded beside


def test_a_pretrained_encoder_finetunes_without_the_recipes_teacher_unless_distill_is_given(pretrained, tmp_path):
    _, pre = pretrained
    run = dict(TINY_RUN, encoder_weights=str(pre / ENCODER_FILE), dataset="synthetic")
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "plain"), **run)
    assert est.config["recipe"]["distill"] == 0.0 and est.config["teacher"] is None
    assert est.config["recipe"]["model"]["guide"] == 0.0 and est.model.guide_head is None  # no teacher, no guidance
    assert not any(isinstance(op, DistillTargets) for op in est.network.ops)
    assert not (tmp_path / "plain" / TEACHER_FILE).exists()
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "taught"), distill=0.5, teacher_epochs=1, **run)
    assert est.config["recipe"]["distill"] == 0.5 and est.config["teacher"]["epochs"] == 1
    assert [op.weight for op in est.network.ops if isinstance(op, MixLosses)] == [0.5]  # the recipe's head with it
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "one"), distill=0.5, distill_head=False, teacher_epochs=1,
                                     **run)
    assert [op.weight for op in est.network.ops if isinstance(op, DistillTargets)] == [0.5]  # one head, mixed target
    assert not any(isinstance(op, MixLosses) for op in est.network.ops)
    # the distillation head asks for the teacher too (the recipe's weight); turning it off does not
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "head"), distill_head=True, teacher_epochs=1, **run)
    assert est.config["recipe"]["distill"] == 0.5 and est.config["recipe"]["model"]["distill_head"]
    assert est.config["teacher"]["epochs"] == 1
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "off"), distill_head=False, **run)
    assert est.config["recipe"]["distill"] == 0.0 and est.config["teacher"] is None
    # so does locality guidance, which imitates the teacher's map
    est = finetune_app.get_estimator(save_dir=str(tmp_path / "guided"), guide=1.0, teacher_epochs=1, **run)
    assert est.config["recipe"]["distill"] == 0.5 and est.config["teacher"]["epochs"] == 1
    assert [op.weight for op in est.network.ops if isinstance(op, LocalityGuidance)] == [1.0]


def test_weight_decay_and_warmup_override_the_recipe_and_are_checked(tmp_path):
    run = dict(TINY_RUN, epochs=4, train_steps_per_epoch=10)  # 40 steps: warmup is capped at a fifth, 8 steps
    default = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                         **run, **TINY_VIT)
    peak = default.config["recipe"]["lr"]
    assert peak == pytest.approx(2e-3 * 16 / 256)  # the recipe's lr at batch 256, scaled to batch 16
    assert default.model.optimizer.param_groups[0]["weight_decay"] == 0.2  # recipe "vit", on the weight matrices
    assert _schedule(default, 40)[:8] == pytest.approx([peak * s / 8 for s in range(1, 9)])  # 10 epochs, capped
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                     weight_decay=0.03, warmup_epochs=0.5, **run, **TINY_VIT)
    assert est.model.optimizer.param_groups[0]["weight_decay"] == 0.03
    assert est.config["recipe"]["weight_decay"] == 0.03 and est.config["recipe"]["warmup_epochs"] == 0.5  # recorded
    assert est.config["overrides"]["weight_decay"] == 0.03 and est.config["overrides"]["warmup_epochs"] == 0.5
    lrs = _schedule(est, 40)  # 0.5 epochs = 5 warmup steps, then a cosine down to 0
    assert lrs[:5] == pytest.approx([peak * s / 5 for s in range(1, 6)])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0)
    no_warmup = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                           warmup_epochs=0, **run, **TINY_VIT)
    assert _schedule(no_warmup, 40)[0] == pytest.approx(peak, rel=0.01)  # the cosine from the first step
    for bad, match in ((dict(weight_decay=-0.1), r"weight_decay must be a number in \[0.0, inf\]"),
                       (dict(warmup_epochs="5"), "warmup_epochs must be a number"),
                       (dict(lr=0), r"lr must be a number in \(0.0, inf\]"),
                       (dict(schedule="step"), "schedule must be one of 'constant', 'warmup_cosine'")):
        with pytest.raises(ValueError, match=match):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                       **bad, **run, **TINY_VIT)
    apphub = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "e"), from_scratch=True,
                                        recipe="apphub", weight_decay=0.0, **run, **TINY_VIT)
    assert apphub.model.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert not any(isinstance(t, LRScheduler) for t in apphub.traces)  # still constant
    warm = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "f"), from_scratch=True,
                                      recipe="apphub", warmup_epochs=0.5, **run, **TINY_VIT)
    apphub_lr = 0.01 * 16 / 128
    assert _schedule(warm, 40) == pytest.approx([apphub_lr * s / 5 for s in range(1, 6)] + [apphub_lr] * 35)


def test_batch_size_scales_the_learning_rate_unless_lr_is_given(tmp_path):
    scaled = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                        **dict(TINY_RUN, batch_size=512), **TINY_VIT)
    assert scaled.config["recipe"]["lr"] == pytest.approx(4e-3) and scaled.config["overrides"]["batch_size"] == 512
    given = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                       lr=1e-3, **dict(TINY_RUN, batch_size=512), **TINY_VIT)
    assert given.config["recipe"]["lr"] == 1e-3 and given.model.optimizer.defaults["lr"] == 1e-3


@pytest.mark.parametrize("bad, match", [(dict(lrr=1e-3), "has no option 'lrr' \\(did you mean 'lr'\\?\\)"),
                                        (dict(refine_epochs=3), "has no option 'refine_epochs'"),
                                        (dict(spt="maybe"), "spt must be True or False, got 'maybe'"),
                                        (dict(num_layers=2.5), "num_layers must be a positive whole number"),
                                        (dict(overwrite="no"), "overwrite must be True or False, got 'no'"),
                                        (dict(batch_size=0), "batch_size must be a positive whole number"),
                                        (dict(recipe="best"), "recipe must be one of 'apphub', 'vit'"),
                                        (dict(pool="max"), "pool must be one of 'cls', 'mean'"),
                                        (dict(stem="cct"), "stem must be one of 'patch', 'conv'"),
                                        (dict(em_dim=33), "not divisible by num_heads")])
def test_unknown_and_invalid_options_are_refused_naming_the_field(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "run"), from_scratch=True,
                                   **{**TINY_RUN, **TINY_VIT, **bad})
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_boolean_options_take_the_command_lines_spellings(tmp_path):
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch="true", lsa="False",
                                     **TINY_RUN, **TINY_VIT)
    assert est.model.config.lsa is False and est.config["overrides"]["lsa"] is False


def test_stochastic_depth_is_off_by_default_and_drop_path_turns_it_back_on(tmp_path):
    def build(folder, **kw):  # without the relative-localization head, whose random token pairs are another draw
        return finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / folder), from_scratch=True,
                                          drloc=0, **kw, **TINY_RUN, **TINY_VIT).model.train()

    x = torch.randn(8, 3, 32, 32)
    default = build("a")  # recipe "vit": no dropout and no stochastic depth, so training mode is deterministic
    assert [b.drop_path.p for b in default.vit_encoder.encoder.layers] == [0.0, 0.0]
    assert torch.equal(default(x), default(x))
    deep = build("b", drop_path=0.1)
    assert [b.drop_path.p for b in deep.vit_encoder.encoder.layers] == [0.0, 0.1]  # timm's linear rule per block
    torch.manual_seed(0)
    assert not all(torch.equal(deep(x), deep(x)) for _ in range(5))  # a branch dropped in some pass


def test_relative_localization_is_on_in_recipe_vit_and_trains_its_head_through_the_app(tmp_path):
    off = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True, drloc=0,
                                     **TINY_RUN, **TINY_VIT)
    assert off.model.config.drloc == 0 and off.model.relative_loc is None
    apphub = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                        recipe="apphub", **TINY_RUN, **TINY_VIT)
    assert apphub.model.relative_loc is None  # the seed's recipe has no such head
    estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                           **TINY_RUN, **TINY_VIT)  # the default recipe, no flag: weight 0.5
    head = [p.detach().clone() for p in estimator.model.relative_loc.parameters()]
    estimator.fit()
    # the auxiliary loss is part of what the update minimises: its head, used by nothing else, has learnt
    assert all(not torch.equal(before, after.detach().cpu())
               for before, after in zip(head, estimator.model.relative_loc.parameters()))
    record = read_record(str(tmp_path / "b" / RECORD_FILE))
    assert record["hparams"]["recipe"]["model"]["drloc"] == 0.5 and record["final_accuracy"] is not None
    with pytest.raises(ValueError, match=r"drloc must be a number in \[0.0, inf\]"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                   drloc=-1, **TINY_RUN, **TINY_VIT)


def test_flip_tta_predicts_the_mean_of_each_image_and_its_mirror_and_records_both_accuracies(tmp_path):
    estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                           tta="flip", **TINY_RUN, **TINY_VIT)
    model = estimator.model
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8), torch.arange(6) % 10  # as the loader gives them
    batch = estimator.network.transform({"x": x, "y": y}, mode="eval")
    images = batch["x"]  # normalised and channels first by the batched ops, as the model sees them
    assert images.shape == (6, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        own, mirrored = model(images), model(images.flip(-1))
    assert not torch.allclose(own, mirrored, atol=1e-3)  # the mirror image changes the logits: the check can fail
    torch.testing.assert_close(batch["y_pred"], (own + mirrored) / 2)
    torch.testing.assert_close(batch["y_pred_no_tta"], own)
    estimator.fit()
    record = read_record(str(tmp_path / "a" / RECORD_FILE))
    assert record["hparams"]["recipe"]["tta"] == "flip"
    assert all({"accuracy", "accuracy_no_tta"} <= e["metrics"].keys() for e in record["eval"])
    off = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                     tta=False, **TINY_RUN, **TINY_VIT)
    batch = off.network.transform({"x": x, "y": y}, mode="eval")
    assert "y_pred_no_tta" not in batch
    off.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(batch["y_pred"], off.model(batch["x"]))


def test_flip_translate_tta_adds_the_one_pixel_shifts_as_airbench_and_records_each_step(tmp_path):
    estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                           **TINY_RUN, **TINY_VIT)  # the default recipe: the shifted views on
    model = estimator.model
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8), torch.arange(6) % 10
    batch = estimator.network.transform({"x": x, "y": y}, mode="eval")
    images = batch["x"]
    # the shifts written out by index, independently of F.pad: content one pixel down-right (row / column -1 mirrors
    # to 1) and one pixel up-left (row / column 32 mirrors to 30)
    down = torch.arange(32).sub(1).abs()
    up = torch.arange(1, 33).clamp(max=31)
    up[-1] = 30
    model.eval()
    with torch.no_grad():
        def flip_mean(view: torch.Tensor) -> torch.Tensor:
            return (model(view) + model(view.flip(-1))) / 2
        own = model(images)
        shifted = (flip_mean(images[:, :, down][..., down]) + flip_mean(images[:, :, up][..., up])) / 2
    assert not torch.allclose(shifted, flip_mean(images), atol=1e-3)  # the shifts change the logits: this can fail
    torch.testing.assert_close(batch["y_pred"], (flip_mean(images) + shifted) / 2)
    torch.testing.assert_close(batch["y_pred_flip"], flip_mean(images))
    torch.testing.assert_close(batch["y_pred_no_tta"], own)
    estimator.fit()
    record = read_record(str(tmp_path / "a" / RECORD_FILE))
    assert record["hparams"]["recipe"]["tta"] == "flip_translate"
    assert all({"accuracy", "accuracy_no_tta", "accuracy_flip"} <= e["metrics"].keys() for e in record["eval"])
    # the boolean of before still works (True is the flip, False no TTA), and a wrong name says what is allowed
    for value, views in ((True, "flip"), ("False", "none")):
        est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / f"b{value}"), from_scratch=True,
                                         tta=value, **TINY_RUN, **TINY_VIT)
        assert est.config["recipe"]["tta"] == views
    with pytest.raises(ValueError, match="tta must be one of 'none', 'flip', 'flip_translate'; got 'shift'"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True, tta="shift",
                                   **TINY_RUN, **TINY_VIT)


def test_tta_predicts_in_the_last_epochs_eval_and_in_test_and_the_evals_before_on_single_images(tmp_path):
    estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                           **dict(TINY_RUN, epochs=3), **TINY_VIT)  # the default: the shifted views
    model = estimator.model
    torch.manual_seed(0)
    x, y = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8), torch.arange(6) % 10
    model.eval()
    for mode, epoch in (("eval", 1), ("eval", 2), ("eval", 3), ("test", 3)):
        batch = estimator.network.transform({"x": x, "y": y}, mode=mode, epoch=epoch)
        with torch.no_grad():
            own = model(batch["x"])
            mirrored = model(batch["x"].flip(-1))
        if epoch < 3:  # before the last epoch: the image alone, one forward pass
            assert "y_pred_no_tta" not in batch and "x_tta" not in batch
            torch.testing.assert_close(batch["y_pred"], own)
        else:  # the last epoch's eval and the test: the views' mean (its values: the flip_translate test above)
            torch.testing.assert_close(batch["y_pred_no_tta"], own)
            torch.testing.assert_close(batch["y_pred_flip"], (own + mirrored) / 2)
            assert not torch.allclose(batch["y_pred"], own, atol=1e-3)  # the views change the prediction
    estimator.fit()
    record = read_record(str(tmp_path / "a" / RECORD_FILE))
    assert [sorted(e["metrics"].keys() & {"accuracy", "accuracy_no_tta", "accuracy_flip"}) for e in record["eval"]] \
        == [["accuracy"]] * 2 + [["accuracy", "accuracy_flip", "accuracy_no_tta"]]
    assert record["final_accuracy"] == record["eval"][-1]["metrics"]["accuracy"]


def test_a_run_with_tta_trains_and_evaluates_as_one_without_until_its_last_epoch(tmp_path):
    runs = {}
    for tta in ("flip_translate", "none"):
        estimator = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / tta), from_scratch=True,
                                               seed=0, tta=tta, **dict(TINY_RUN, epochs=3), **TINY_VIT)
        estimator.fit()
        record = read_record(str(tmp_path / tta / RECORD_FILE))
        runs[tta] = estimator.model, [e["metrics"]["ce"] for e in record["eval"]]
    (views, views_ce), (plain, plain_ce) = runs["flip_translate"], runs["none"]
    assert all(torch.equal(a, b) for a, b in zip(views.parameters(), plain.parameters()))  # the same training
    assert views_ce[:2] == plain_ce[:2] and views_ce[2] != plain_ce[2]  # the same evals, but for the last one's views


def test_a_saved_model_loads_with_or_without_the_training_only_head(tmp_path):
    """`weights_path` files without a run_record.json beside them: one saved without the relative-localization head
    (`drloc` 0, the default before) loads into the default, which keeps its fresh head; one saved with it loads into a
    model without it. Any other difference is still refused."""
    def build(folder, **kw):
        return finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / folder), **kw, **TINY_RUN,
                                          **TINY_VIT).model

    plain = build("a", from_scratch=True, drloc=0)
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    with_head = build("b", weights_path=str(tmp_path / "plain.pt"))
    assert with_head.relative_loc is not None
    kept = {k: v for k, v in with_head.state_dict().items() if not k.startswith("relative_loc.")}
    assert kept.keys() == plain.state_dict().keys()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in kept.items())
    torch.save(with_head.state_dict(), tmp_path / "head.pt")
    back = build("c", weights_path=str(tmp_path / "head.pt"), drloc=0)
    assert back.relative_loc is None and all(torch.equal(v, kept[k]) for k, v in back.state_dict().items())
    with pytest.raises(ValueError, match="does not fit this model: .*attn_scale"):
        build("d", weights_path=str(tmp_path / "head.pt"), lsa=False)
    # the distillation head is used in eval, so a file must match it; the error says which value the file needs
    with pytest.raises(ValueError, match=r"missing \['distill_classifier.*saved with distill_head=False\)"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "e"), weights_path=str(
            tmp_path / "plain.pt"), **TINY_RUN, **TINY_SHAPE)  # the recipe's distillation, so its head
    taught = ViTModel.from_config(plain.linear_classifier.out_features, replace(plain.config, distill_head=True))
    torch.save(taught.state_dict(), tmp_path / "taught.pt")
    with pytest.raises(ValueError, match=r"unexpected \['distill_classifier.*saved with distill_head=True\)"):
        build("f", weights_path=str(tmp_path / "taught.pt"))


def test_weight_decay_spares_biases_norms_and_embeddings_unless_decay_all(tmp_path):
    def build(folder, **kw):
        return finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / folder), from_scratch=True,
                                          **kw, **TINY_RUN, **TINY_VIT)

    def decayed_by_a_step(model):
        """Names of the parameters that one optimizer step with zero gradients changes: only weight decay acts."""
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.data.fill_(0.5)  # away from 0, so that decay shows
            p.grad = torch.zeros_like(p)
        model.optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, torch.full_like(before[n], 0.5))}

    est = build("a")  # recipe "vit": decay="matrices"
    default = est.model
    assert est.config["recipe"]["decay"] == "matrices"  # recorded in run_record.json
    names = {n for n, _ in default.named_parameters()}
    skip = default.no_weight_decay()
    assert skip and decayed_by_a_step(default) == names - skip
    assert [g["weight_decay"] for g in default.optimizer.param_groups] == [0.2, 0.0]
    everything = build("c", decay="all", weight_decay=0.1).model
    assert decayed_by_a_step(everything) == names
    assert [g["weight_decay"] for g in everything.optimizer.param_groups] == [0.1]
    apphub = build("d", recipe="apphub").model
    assert len(apphub.optimizer.param_groups) == 1  # the seed decays every parameter, as the apphub's SGD
    with pytest.raises(ValueError, match="decay must be one of 'all', 'matrices'"):
        build("e", decay=False)


def test_label_smoothing_overrides_the_recipe_and_is_checked(tmp_path):
    def smoothing_ops(est):
        return [op for op in est.network.ops if isinstance(op, SmoothLabels)]

    assert [op.smoothing for op in smoothing_ops(finetune_app.get_estimator(
        dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True, **TINY_RUN, **TINY_VIT))] == [0.1]
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                     label_smoothing=0.25, **TINY_RUN, **TINY_VIT)
    assert [op.smoothing for op in smoothing_ops(est)] == [0.25] and est.config["recipe"]["label_smoothing"] == 0.25
    off = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                     label_smoothing=0, **TINY_RUN, **TINY_VIT)
    assert not smoothing_ops(off)  # hard labels: the loss reads "y"
    assert [op.inputs for op in off.network.ops if type(op).__name__ == "CrossEntropy"][0] == ["y_pred", "y"]
    mixed = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                       label_smoothing=0.3, mix_prob=0.5, **TINY_RUN, **TINY_VIT)
    assert [op.label_smoothing for op in mixed.network.ops if type(op).__name__ == "MixUpCutMix"] == [0.3]
    assert not smoothing_ops(mixed)  # MixUpCutMix writes the smoothed labels itself
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "e"), from_scratch=True,
                                       label_smoothing=bad, **TINY_RUN, **TINY_VIT)


def test_the_apphub_recipe_is_the_seed_and_loads_an_apphub_checkpoint(tmp_path):
    from tests.test_vit import ApphubViT  # FastEstimator apphub vit_torch.py's model, rebuilt from torch layers
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                     recipe="apphub", **{**TINY_RUN, "batch_size": None})
    assert est.model.config == ViTConfig()  # the apphub's architecture: post-norm, CLS token, dropout 0.1, no SPT/LSA
    opt = est.model.optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["lr"] == 0.01 and opt.defaults["momentum"] == 0.9
    assert opt.defaults["weight_decay"] == 1e-4 and est.pipeline.data["train"][""].images_per_batch == 128
    assert not any(isinstance(t, LRScheduler) for t in est.traces) and not any(
        isinstance(op, SmoothLabels) for op in est.network.ops)
    assert [type(op).__name__ for op in est.network.ops[0].ops] == ["ChannelTranspose", "Normalize", "PadIfNeeded",
                                                                    "RandomCrop", "HorizontalFlip", "CoarseDropout"]
    # an apphub checkpoint loads into it as a whole model (for `fastestimator test`) and as an encoder
    apphub = ApphubViT(num_classes=10, num_layers=6, image_size=32, patch_size=4, num_channels=3, em_dim=256,
                       num_heads=8, ff_dim=512)
    torch.save(apphub.state_dict(), tmp_path / "apphub.pt")
    tested = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), recipe="apphub",
                                        weights_path=str(tmp_path / "apphub.pt"), **TINY_RUN)
    assert all(torch.equal(v, apphub.state_dict()[k]) for k, v in tested.model.state_dict().items())
    tuned = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), recipe="apphub",
                                       encoder_weights=str(tmp_path / "apphub.pt"), **TINY_RUN)
    assert all(torch.equal(v, apphub.vit_encoder.state_dict()[k]) for k, v in
               tuned.model.vit_encoder.state_dict().items())
    with pytest.raises(ValueError, match="does not fit this model: missing .*attn_scale"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"),
                                   weights_path=str(tmp_path / "apphub.pt"), **TINY_RUN)  # recipe "vit" has LSA


def test_a_saved_model_from_before_the_stem_field_is_rebuilt_as_it_was_trained(tmp_path):
    """A best-model file of the SPT default of earlier versions, whose run_record.json has no `stem`: `fastestimator
    test` (weights_path) builds the patch-stem SPT model it is, not today's conv-stem recipe, and loads it whole."""
    old = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "old"), from_scratch=True,
                                     stem="patch", spt=True, **TINY_RUN, **TINY_VIT)
    old.fit(warmup=False)
    record_path = tmp_path / "old" / RECORD_FILE
    record = json.loads(record_path.read_text())
    del record["hparams"]["recipe"]["model"]["stem"]  # as the records of earlier versions were written
    record_path.write_text(json.dumps(record))
    weights = next((tmp_path / "old").glob("vit_finetune_best_*.pt"))
    tested = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "test"), weights_path=str(weights),
                                        **TINY_RUN)
    assert tested.model.config.stem == "patch" and tested.model.config.spt
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(v.cpu(), saved[k].cpu()) for k, v in tested.model.state_dict().items())


def test_overrides_from_the_command_line_and_a_hyperparameters_file_are_applied_and_recorded(tmp_path):
    app = str(REPO / "apphub_vit" / "pretrain.py")
    _run_cli([app, "--dataset", "synthetic", "--save_dir", str(tmp_path / "cli"), "--weight_decay", "0.07",
              "--lsa", "false", "--augment", "trivialaugment"] + CLI_TINY, cwd=tmp_path)
    record = read_record(str(tmp_path / "cli" / RECORD_FILE))["hparams"]
    assert {k: record["overrides"][k] for k in ("weight_decay", "lsa", "augment")} == dict(
        weight_decay=0.07, lsa=False, augment="trivialaugment")
    assert record["recipe"]["weight_decay"] == 0.07 and record["recipe"]["model"]["lsa"] is False
    assert record["recipe"]["model"]["stem"] == "conv" and record["recipe"]["name"] == "vit"  # the rest: the recipe's
    config = tmp_path / "my.json"
    config.write_text(json.dumps({"recipe": "vit", "lr": 0.003, "label_smoothing": 0.2, "lsa": False,
                                  "save_dir": str(tmp_path / "json"), "dataset": "synthetic"}))
    _run_cli([app, "--hyperparameters", str(config)] + CLI_TINY, cwd=tmp_path)
    record = read_record(str(tmp_path / "json" / RECORD_FILE))["hparams"]
    assert {k: record["overrides"][k] for k in ("lr", "label_smoothing", "lsa")} == dict(lr=0.003,
                                                                                         label_smoothing=0.2, lsa=False)
    assert record["recipe"]["lr"] == 0.003 and record["recipe"]["model"]["lsa"] is False


def test_the_command_line_refuses_an_unknown_option_naming_it(tmp_path):
    out = subprocess.run(fastestimator_cmd() + ["train", str(REPO / "apphub_vit" / "pretrain.py"), "--dataset",
                                                "synthetic", "--save_dir", str(tmp_path / "run"), "--lrr", "0.1"],
                         capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=600)
    assert out.returncode != 0 and "has no option 'lrr' (did you mean 'lr'?)" in out.stderr
    assert not (tmp_path / "run").exists()


def test_fit_freezes_what_outlives_an_epoch_and_unfreezes_at_the_end(tmp_path):
    """FastEstimator's Pipeline runs a full gc.collect() after every epoch; the AppEstimator freezes what survived each
    epoch so that those collections stop scanning it (most of a CIFAR eval epoch on a GPU host), and unfreezes at
    the end so the run's own reference cycles can be collected afterwards."""
    import gc

    from fastestimator.trace import Trace

    class FrozenAtEpochStart(Trace):
        def __init__(self):
            super().__init__(mode="train")
            self.counts = []

        def on_epoch_begin(self, data):
            self.counts.append(gc.get_freeze_count())

    gc.unfreeze()
    est = finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                                     **dict(TINY_RUN, epochs=2), **TINY_VIT)
    probe = FrozenAtEpochStart()
    est.traces.append(probe)
    est.fit()
    # what existed before fit() is frozen from its start, and epoch 2 starts with epoch 1's survivors frozen too
    assert probe.counts[0] > 1000 and probe.counts[1] > probe.counts[0], probe.counts
    assert gc.get_freeze_count() == 0


def test_building_a_model_collects_only_the_garbage_it_made(monkeypatch):
    """FastEstimator's `fe.build` runs a full gc.collect(); `runs.build_model` keeps it off the objects that exist
    already (frozen for the call, unfrozen after), and inside a frozen stretch leaves the freezing as it is."""
    import gc

    import fastestimator.network
    from apphub_vit.runs import build_model
    seen = []
    real_collect = fastestimator.network.gc.collect
    monkeypatch.setattr(fastestimator.network.gc, "collect",
                        lambda *args: seen.append(gc.get_freeze_count()) or real_collect(*args))
    gc.unfreeze()
    model = build_model(model_fn=lambda: torch.nn.Linear(4, 2), optimizer_fn=None, model_name="probe")
    assert isinstance(model, torch.nn.Linear) and model.model_name == "probe"
    assert len(seen) == 1 and seen[0] > 10_000 and gc.get_freeze_count() == 0
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        build_model(model_fn=lambda: torch.nn.Linear(4, 2), optimizer_fn=None, model_name="probe")
        assert gc.get_freeze_count() > 0.9 * frozen  # a fit's freezing kept (less what reference counts freed)
    finally:
        gc.unfreeze()


def test_fit_and_test_hand_the_models_back_from_the_gpu(tmp_path):
    """On a GPU `DeviceNetwork` keeps the models there between epochs; the AppEstimator unloads them after fit() and
    after test(), even when they fail, so a caller gets them on the CPU as from FastEstimator's own network (the
    moves themselves are tested on a GPU in test_device_network.py)."""
    from unittest import mock

    import fastestimator as fe

    from apphub_vit.device_network import DeviceNetwork
    est = finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path),
                                     **dict(TINY_RUN, epochs=1), **TINY_VIT)
    assert isinstance(est.network, DeviceNetwork)
    with mock.patch.object(DeviceNetwork, "unload", autospec=True) as unload:
        est.fit()
        assert unload.call_count == 1
        est.test()
        assert unload.call_count == 2
        with mock.patch.object(fe.Estimator, "test", side_effect=RuntimeError("boom")):
            with pytest.raises(RuntimeError):
                est.test()
        assert unload.call_count == 3


def test_validation_holds_out_the_last_training_images_and_keeps_the_test_set_for_test(tmp_path):
    import numpy as np

    from apphub_vit.data import load_cifar
    from apphub_vit.options import OptionError
    full_train, test = load_cifar(10, "synthetic", num_train=256, num_eval=64)
    est = finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path), validation=48,
                                     **dict(TINY_RUN, synthetic_size=[256, 64]), **TINY_VIT)
    x = {mode: est.pipeline.data[mode][""].dataset.arrays["x"].cpu().numpy() for mode in ("train", "eval", "test")}
    full = np.stack([full_train[i]["x"] for i in range(256)])
    assert np.array_equal(x["train"], full[:208]) and np.array_equal(x["eval"], full[208:])
    assert np.array_equal(x["test"], np.stack([test[i]["x"] for i in range(64)]))
    assert est.config["validation"] == 48
    with pytest.raises(ValueError, match="would hold out every one of the 256 training images"):
        finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "b"),
                                   validation=256, **dict(TINY_RUN, synthetic_size=[256, 64]), **TINY_VIT)
    with pytest.raises(OptionError, match="validation"):
        finetune_app.get_estimator(from_scratch=True, dataset="synthetic", save_dir=str(tmp_path / "c"),
                                   validation=-1, **TINY_RUN, **TINY_VIT)


def _write_cifar100_as_distributed(folder, n=64):
    """A `cifar-100-python` folder in the exact format of the CIFAR site's python version: pickles (protocol 2, as
    Python 2's cPickle wrote them) of bytes keys, `data` [N, 3072] uint8 rows (1024 red, green, blue), `fine_labels`,
    `coarse_labels`, `filenames`, `batch_label`; `meta` holds the label names."""
    import pickle

    import numpy as np
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)],
                 b"batch_label": f"{name}ing batch 1 of 1".encode(), b"fine_labels": [i % 100 for i in range(n)],
                 b"coarse_labels": [i % 20 for i in range(n)],
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, f, protocol=2)


def test_the_default_recipe_pretrains_on_a_cifar100_python_folder(tmp_path):
    """CIFAR-100 readiness: no CIFAR-100 exists on these machines, so a generated folder in the distributed format."""
    _write_cifar100_as_distributed(tmp_path / "data" / "cifar-100-python")
    model = pretrain_app.pretrain(data_dir=str(tmp_path / "data"), save_dir=str(tmp_path / "run"), epochs=1,
                                  batch_size=16, train_steps_per_epoch=2, teacher_epochs=1,
                                  **{**TINY_VIT, "distill": 0.5})  # the recipe's teacher too, on 100 classes, 1 epoch
    record = read_record(tmp_path / "run" / RECORD_FILE)
    assert record["hparams"]["recipe"]["name"] == "vit" and record["hparams"]["dataset"] == "cifair100"
    assert record["hparams"]["recipe"]["distill"] == 0.5 and record["hparams"]["teacher"]["epochs"] == 1
    assert record["hparams"]["recipe"]["model"]["stem"] == "conv"
    assert record["hparams"]["recipe"]["augment"] == "autoaugment"
    assert record["schedule"]["global_steps"] == 2 and 0.0 <= record["final_accuracy"] <= 1.0
    assert model.linear_classifier.out_features == 100
    assert (tmp_path / "run" / ENCODER_FILE).is_file()
