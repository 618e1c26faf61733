"""apphub_vit/pretrain.py and finetune.py: the command line, the Python API, weight transfer and every bad input."""
import subprocess
import sys

import pytest
import torch
from fastestimator.trace.adapt import LRScheduler

from apphub_vit import finetune as finetune_app
from apphub_vit import pretrain as pretrain_app
from apphub_vit.encoder_io import ENCODER_FILE, EncoderMismatchError, load_encoder_state
from apphub_vit.prediction_grid import GRID_FILE
from apphub_vit.records import RECORD_FILE, read_record
from networks.vit import ViTModel
from pipelines import batched
from tests.conftest import REPO, TINY_RUN, TINY_VIT, cli_env, fastestimator_cmd, shared_path

CLI_TINY = ["--epochs", "1", "--batch_size", "16", "--train_steps_per_epoch", "3", "--eval_steps_per_epoch", "2",
            "--num_process", "0", "--synthetic_size", "[256,64]", "--num_layers", "2", "--em_dim", "32", "--num_heads",
            "2", "--ff_dim", "64", "--patch_size", "8"]


def _run_cli(args, cwd):
    out = subprocess.run(fastestimator_cmd() + ["train"] + args, capture_output=True, text=True, env=cli_env(),
                         cwd=cwd, timeout=600)
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
                                          ({"lsa": True}, "lsa: pretrained False vs model True"),
                                          ({"spt": True}, "spt: pretrained False vs model True")])
def test_other_architecture_is_an_error_naming_the_mismatch(pretrained, tmp_path, change, named):
    _, save_dir = pretrained
    with pytest.raises(EncoderMismatchError, match=named):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path),
                                   encoder_weights=str(save_dir / ENCODER_FILE), **TINY_RUN, **change)


def test_lsa_spt_encoder_transfers_as_such_and_old_encoder_files_load_without_them(pretrained, tmp_path):
    sl_model = pretrain_app.pretrain(dataset="synthetic", save_dir=str(tmp_path / "pre"), lsa=True, spt=True,
                                     **TINY_RUN, **TINY_VIT)
    assert sl_model.config.lsa and sl_model.config.spt
    encoder = str(tmp_path / "pre" / ENCODER_FILE)
    assert load_encoder_state(encoder)["config"]["lsa"] is True and load_encoder_state(encoder)["config"]["spt"] is True
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "fine"), encoder_weights=encoder,
                                     **TINY_RUN)  # lsa and spt read from the file, as the sizes are
    assert est.model.config.lsa and est.model.config.spt
    for i, layer in enumerate(est.model.vit_encoder.encoder.layers):
        assert torch.equal(layer.attn_scale, sl_model.vit_encoder.encoder.layers[i].attn_scale.cpu())
    assert torch.equal(est.model.vit_encoder.embedding.patch_norm.weight,
                       sl_model.vit_encoder.embedding.patch_norm.weight.cpu())
    for option in ("lsa", "spt"):
        with pytest.raises(EncoderMismatchError, match=f"{option}: pretrained True vs model False"):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "plain"), encoder_weights=encoder,
                                       **{option: False}, **TINY_RUN)
    # an encoder file from before the options: no "lsa" / "spt" in its config, and a plain ViT
    _, save_dir = pretrained
    saved = torch.load(save_dir / ENCODER_FILE, map_location="cpu", weights_only=False)
    del saved["config"]["lsa"], saved["config"]["spt"]
    torch.save(saved, tmp_path / "old.pt")
    old = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "old"),
                                     encoder_weights=str(tmp_path / "old.pt"), **TINY_RUN)
    assert not old.model.config.lsa and not old.model.config.spt


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
    with pytest.raises(EncoderMismatchError, match="Cannot read encoder weights"):
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
    with pytest.raises(ValueError, match="augment_policy must be one of"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True,
                                   augment_policy="randaugment", **TINY_RUN, **TINY_VIT)
    with pytest.raises(ValueError, match="mix_prob .* between 0 and 1"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path), from_scratch=True, mix_prob=2,
                                   **TINY_RUN, **TINY_VIT)


def test_weight_decay_and_warmup_override_the_recipe_and_are_checked(tmp_path):
    run = dict(TINY_RUN, epochs=4, train_steps_per_epoch=10)  # 40 steps: warmup is capped at a fifth, 8 steps

    def schedule(est):
        return [next(t for t in est.traces if isinstance(t, LRScheduler)).lr_fn(step) for step in range(1, 41)]

    default = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                         **run, **TINY_VIT)
    peak = default.config["lr"]
    assert default.model.optimizer.param_groups[0]["weight_decay"] == 0.2  # recipe "vit", on the weight matrices
    assert schedule(default)[:8] == pytest.approx([peak * s / 8 for s in range(1, 9)])  # 10 epochs, capped
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                     weight_decay=0.03, warmup_epochs=0.5, **run, **TINY_VIT)
    assert est.model.optimizer.param_groups[0]["weight_decay"] == 0.03
    assert est.config["recipe"]["weight_decay"] == 0.03 and est.config["recipe"]["warmup_epochs"] == 0.5  # recorded
    lrs = schedule(est)  # 0.5 epochs = 5 warmup steps, then a cosine down to 0
    assert lrs[:5] == pytest.approx([peak * s / 5 for s in range(1, 6)])
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(0)
    no_warmup = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                           warmup_epochs=0, **run, **TINY_VIT)
    assert schedule(no_warmup)[0] == pytest.approx(peak, rel=0.01)  # the cosine from the first step, not constant
    for bad, match in ((dict(weight_decay=-0.1), "weight_decay must be a number >= 0"),
                       (dict(warmup_epochs="5"), "warmup_epochs must be a number >= 0"),
                       (dict(recipe="apphub", warmup_epochs=5), "recipe 'apphub' keeps its learning rate constant")):
        with pytest.raises(ValueError, match=match):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                       **bad, **run, **TINY_VIT)
    apphub = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "e"), from_scratch=True,
                                        recipe="apphub", weight_decay=0.0, **run, **TINY_VIT)
    assert apphub.model.optimizer.param_groups[0]["weight_decay"] == 0.0
    assert not any(isinstance(t, LRScheduler) for t in apphub.traces)  # still constant


def test_weight_init_option_initialises_a_new_model_but_never_a_loaded_encoder(pretrained, tmp_path):
    model, save_dir = pretrained
    scratch = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                         weight_init="trunc_normal", **TINY_RUN, **TINY_VIT).model
    assert torch.count_nonzero(scratch.linear_classifier.bias) == 0
    assert torch.count_nonzero(scratch.vit_encoder.encoder.layers[0].self_attn.in_proj_bias) == 0
    default = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                         **TINY_RUN, **TINY_VIT).model
    assert torch.count_nonzero(default.linear_classifier.bias) > 0  # recipe "vit": PyTorch's defaults
    tuned = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), weight_init="trunc_normal",
                                       encoder_weights=str(save_dir / ENCODER_FILE), **TINY_RUN).model
    theirs = model.vit_encoder.state_dict()
    assert all(torch.equal(v.cpu(), theirs[k].cpu()) for k, v in tuned.vit_encoder.state_dict().items())
    assert torch.count_nonzero(tuned.linear_classifier.bias) == 0  # the new head is initialised
    with pytest.raises(ValueError, match="weight_init must be one of"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                   weight_init="xavier", **TINY_RUN, **TINY_VIT)


def test_stochastic_depth_is_off_by_default_and_drop_path_turns_it_back_on(tmp_path):
    def build(folder, **kw):
        return finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / folder), from_scratch=True,
                                          **kw, **TINY_RUN, **TINY_VIT).model.train()

    x = torch.randn(8, 3, 32, 32)
    default = build("a")  # recipe "vit": no dropout and no stochastic depth, so training mode is deterministic
    assert [b.drop_path.p for b in default.vit_encoder.encoder.layers] == [0.0, 0.0]
    assert torch.equal(default(x), default(x))
    deep = build("b", drop_path=0.1)
    assert [b.drop_path.p for b in deep.vit_encoder.encoder.layers] == [0.0, 0.1]  # timm's linear rule per block
    torch.manual_seed(0)
    assert not all(torch.equal(deep(x), deep(x)) for _ in range(5))  # a branch dropped in some pass


def test_repeated_aug_reaches_the_training_loader_and_is_checked(tmp_path):
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                     repeated_aug=3, **TINY_RUN, **TINY_VIT)
    xs = torch.cat([batch["x"] for batch in est.pipeline.data["train"][""]])  # one epoch of raw uint8 images
    n = len(xs) - len(xs) % 3
    assert torch.equal(xs[0:n:3], xs[1:n:3]) and torch.equal(xs[0:n:3], xs[2:n:3])  # three copies side by side
    assert len(torch.unique(xs.flatten(1), dim=0)) == -(-len(xs) // 3)  # of a third of the images
    assert est.config["repeated_aug"] == 3  # recorded in run_record.json
    assert est.pipeline.data["eval"][""].repeats == 1
    with pytest.raises(ValueError, match="repeated_aug must be a positive integer"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                   repeated_aug=0, **TINY_RUN, **TINY_VIT)
    with pytest.raises(ValueError, match="use device_augment=True with it"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                   repeated_aug=3, device_augment=False, strong_augment=False, **TINY_RUN, **TINY_VIT)


def test_refine_epochs_turn_the_strong_augmentation_off_for_the_last_epochs_and_are_checked(tmp_path, monkeypatch):
    calls = {"AutoAugment": [], "MixUpCutMix": []}
    for name in calls:
        cls = getattr(batched, name)
        monkeypatch.setattr(cls, "forward", lambda self, data, state, _f=cls.forward, _n=name: (
            calls[_n].append(1), _f(self, data, state))[1])
    run = {**TINY_RUN, "epochs": 3, "train_steps_per_epoch": 2}
    est = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "a"), from_scratch=True,
                                     augment_policy="autoaugment", mix_prob=0.5, refine_epochs=1, **run, **TINY_VIT)
    est.fit(warmup=False)  # epoch 3 trains on the smoothed labels that MixUpCutMix wrote in epochs 1-2
    assert len(calls["AutoAugment"]) == len(calls["MixUpCutMix"]) == 2 * 2  # epochs 1 and 2 only, two steps each
    assert est.config["refine_epochs"] == 1  # recorded in run_record.json
    for bad, why in ((3, "from 0 \\(off\\) to epochs - 1 = 2"), (-1, "whole number"), (1.5, "whole number")):
        with pytest.raises(ValueError, match=why):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "b"), from_scratch=True,
                                       refine_epochs=bad, **run, **TINY_VIT)
    with pytest.raises(ValueError, match="strong_augment is off"):
        finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "c"), from_scratch=True,
                                   refine_epochs=1, strong_augment=False, **run, **TINY_VIT)


def test_weight_decay_spares_biases_norms_and_embeddings_unless_decay_all(tmp_path):
    def build(folder, **kw):
        return finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / folder), from_scratch=True,
                                          lsa=True, spt=True, **kw, **TINY_RUN, **TINY_VIT)

    def decayed_by_a_step(model):
        """Names of the parameters that one optimizer step with zero gradients changes: only weight decay acts."""
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for p in model.parameters():
            p.data.fill_(0.5)  # away from 0, so that decay shows
            p.grad = torch.zeros_like(p)
        model.optimizer.step()
        return {n for n, p in model.named_parameters() if not torch.equal(p, torch.full_like(before[n], 0.5))}

    est = build("a")  # recipe "vit": decay_all=False
    default = est.model
    assert est.config["recipe"]["decay_all"] is False  # recorded in run_record.json
    names = {n for n, _ in default.named_parameters()}
    skip = default.no_weight_decay()
    assert skip and decayed_by_a_step(default) == names - skip
    assert [g["weight_decay"] for g in default.optimizer.param_groups] == [0.2, 0.0]
    everything = build("c", decay_all=True, weight_decay=0.1).model
    assert decayed_by_a_step(everything) == names
    assert [g["weight_decay"] for g in everything.optimizer.param_groups] == [0.1]
    apphub = finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "d"), from_scratch=True,
                                        recipe="apphub", **TINY_RUN, **TINY_VIT).model
    assert len(apphub.optimizer.param_groups) == 1  # the seed decays every parameter, as the apphub's SGD
    with pytest.raises(ValueError, match="decay_all must be True .* or False"):
        build("e", decay_all="false")


def test_label_smoothing_overrides_the_recipe_and_is_checked(tmp_path):
    def smoothing_ops(est):
        return [op for op in est.network.ops if type(op).__name__ == "_LabelSmoothing"]

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
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing"):
            finetune_app.get_estimator(dataset="synthetic", save_dir=str(tmp_path / "e"), from_scratch=True,
                                       label_smoothing=bad, **TINY_RUN, **TINY_VIT)
