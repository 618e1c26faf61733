"""Saving a ViT encoder after pretraining, and loading it into a finetuning model, with clear errors.

The file (``vit_encoder.pt`` in the pretraining run's save_dir) is a `torch.save`d dict:
``{"format": "apphub_vit.vit_encoder/1", "config": <ViTConfig fields>, "state_dict": <vit_encoder.state_dict()>}``.
`load_encoder_state` also takes what other tools write: a full `ViTModel` checkpoint (FastEstimator's BestModelSaver
`.pt`, keys `vit_encoder.*`, from this project or the FastEstimator apphub) or a bare encoder `state_dict`.
"""
import os
import pickle
from dataclasses import asdict, fields
from typing import Any, Dict, Mapping, Optional, Union

import torch
from fastestimator.trace import Trace
from fastestimator.util.data import Data

from networks.util import non_finite, state_dict_mismatches
from networks.vit import ViTConfig, ViTEncoder, ViTModel

ENCODER_FORMAT = "apphub_vit.vit_encoder/1"
ENCODER_FILE = "vit_encoder.pt"


class EncoderMismatchError(ValueError):
    """Encoder weights that do not fit the model they are loaded into; the message names the mismatch."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_encoder(model: torch.nn.Module, path: str, overwrite: bool = False) -> str:
    """Write the encoder of a `ViTModel` (or a `ViTEncoder`) to `path`. Refuses to replace a file unless told."""
    module = unwrap(model)
    encoder = module.vit_encoder if isinstance(module, ViTModel) else module
    if not isinstance(encoder, ViTEncoder):
        raise TypeError(f"save_encoder needs a ViTModel or ViTEncoder, got {type(module).__name__}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"'{path}' already exists; not overwriting saved weights. Choose another save_dir, or "
                              f"pass overwrite=True to replace it.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    bad = non_finite(state)
    if bad:
        raise ValueError(f"Not saving the encoder to '{path}': its weights are not finite ({', '.join(bad[:3])}...); "
                         f"the training diverged. Lower the learning rate and train again.")
    tmp = f"{path}.partial"
    torch.save({"format": ENCODER_FORMAT, "config": asdict(encoder.config), "state_dict": state}, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated file under the real name
    return path


GET_ONE = (f"Pass the '{ENCODER_FILE}' that pretraining writes in its save_dir (fastestimator train "
           f"apphub_vit/pretrain.py), or a ViTModel checkpoint such as its vit_pretrain_best_accuracy.pt.")


def read_weights(path: str, what: str = "Encoder weights", get_one: str = GET_ONE,
                 inside: str = ENCODER_FILE) -> Any:
    """A torch file's contents, read with `weights_only=True`; for anything else an error that says what the file is
    (`what` names it) and how to get a good one (`get_one`); a folder is pointed to the `inside` file."""
    if os.path.isdir(path):
        found = os.path.join(path, inside)
        hint = f"pass '{found}'" if os.path.isfile(found) else f"pass the '{inside}' inside a run's save_dir"
        raise EncoderMismatchError(f"{what} '{path}' is a folder: {hint}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} '{path}' do not exist. {get_one}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise EncoderMismatchError(f"{what} '{path}' is an empty file (0 bytes). {get_one}")
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip archive, or its legacy pickle format
        raise EncoderMismatchError(f"{what} '{path}' is not a file torch.save wrote (it starts with {head!r}). "
                                   f"{get_one}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused a global: the file holds more than tensors
        raise EncoderMismatchError(f"{what} '{path}' holds Python objects besides tensors and plain values; not "
                                   f"loading it, since unpickling those could run code. {get_one}") from None
    except Exception as err:  # a zip archive cut short, a damaged file
        raise EncoderMismatchError(f"{what} '{path}' is truncated or damaged ({type(err).__name__}); copy it "
                                   f"again. {get_one}") from None


def _loaded(state_dict: Mapping[str, Any], config: Optional[Dict[str, Any]], source: str) -> Dict[str, Any]:
    return {"format": ENCODER_FORMAT, "state_dict": state_dict, "config": config, "source": source}


def load_encoder_state(source: Union[str, torch.nn.Module, Mapping[str, Any]]) -> Dict[str, Any]:
    """A `ViTEncoder` state_dict (and the config it was saved with, if known) from a path, model or dict.

    Returns a dict in the file's own format, {"format", "state_dict", "config" (None if unknown), "source"}, which
    this function and `load_encoder` also accept back.
    """
    name = source if isinstance(source, str) else type(source).__name__
    if isinstance(source, torch.nn.Module):
        module = unwrap(source)
        encoder = module.vit_encoder if isinstance(module, ViTModel) else module
        if not isinstance(encoder, ViTEncoder):
            raise TypeError(f"pretrained must be a ViTModel, a ViTEncoder or a path, got {type(module).__name__}")
        return _loaded(encoder.state_dict(), asdict(encoder.config), name)
    data = read_weights(source) if isinstance(source, str) else source
    if not isinstance(data, Mapping):
        raise EncoderMismatchError(f"'{name}' holds a {type(data).__name__}, not ViT encoder weights.")
    if data.get("format") == ENCODER_FORMAT:
        return _loaded(data["state_dict"], data.get("config"), data.get("source", name))
    if any(k.startswith("vit_encoder.") for k in data):  # a whole ViTModel checkpoint: keep the encoder part
        data = {k[len("vit_encoder."):]: v for k, v in data.items() if k.startswith("vit_encoder.")}
    if not any(k.startswith("embedding.") for k in data):
        raise EncoderMismatchError(f"'{name}' is not a ViT encoder: none of its keys ({list(data)[:4]}...) belong to "
                                   f"a ViTEncoder (expected 'embedding.*', 'encoder.layers.*', 'layernorm.*').")
    return _loaded(dict(data), None, name)


# the model fields an encoder fixes for finetuning; `pool` (what the head reads) is the encoder's only by default
ARCHITECTURE = ("num_layers", "em_dim", "num_heads", "ff_dim", "patch_size", "norm_first", "lsa", "spt", "stem",
                "pool")


def pretrained_architecture(loaded: Mapping[str, Any]) -> Dict[str, Any]:
    """The model fields of a loaded encoder ({} when its file has no config, e.g. a bare state_dict: then the weights'
    shapes are checked against the model at load). Fields an older file lacks take `ViTConfig`'s defaults, which is
    what such files held: CLS-token encoders without LSA or SPT, on the patch stem."""
    if loaded["config"] is None:
        return {}
    known = {f.name for f in fields(ViTConfig)}
    config = ViTConfig(**{k: v for k, v in loaded["config"].items() if k in known})
    return {k: getattr(config, k) for k in ARCHITECTURE}


def load_encoder(model: torch.nn.Module, source: Union[str, torch.nn.Module, Mapping[str, Any]]) -> None:
    """Copy pretrained encoder weights into `model.vit_encoder`; an architecture mismatch raises a named error."""
    target = unwrap(model)
    target = target.vit_encoder if isinstance(target, ViTModel) else target
    loaded = load_encoder_state(source)
    if loaded["config"] is not None:
        want = target.config.encoder_signature()
        got = ViTConfig(**loaded["config"]).encoder_signature()
        diff = [f"{k}: pretrained {got[k]} vs model {want[k]}" for k in want if got.get(k) != want[k]]
        if diff:
            raise EncoderMismatchError(f"Encoder weights from '{loaded['source']}' were trained with a different "
                                       f"architecture ({'; '.join(diff)}). Build the finetuning model with the "
                                       f"pretraining configuration.")
    parts = state_dict_mismatches(target.state_dict(), loaded["state_dict"], loaded_name="pretrained")
    if parts:
        raise EncoderMismatchError(f"Encoder weights from '{loaded['source']}' do not fit this model (other em_dim, "
                                   f"depth or patch size?): {'; '.join(parts)}")
    target.load_state_dict(loaded["state_dict"])


class EncoderSaver(Trace):
    """Writes the model's encoder to `save_dir/vit_encoder.pt` at the end of training, for finetuning elsewhere."""
    def __init__(self, model: torch.nn.Module, save_dir: str, overwrite: bool = False) -> None:
        super().__init__(mode="train")
        self.model = model
        self.path = os.path.join(save_dir, ENCODER_FILE)
        self.overwrite = overwrite
        self.saved: Optional[str] = None

    def on_end(self, data: Data) -> None:
        if non_finite(self.model.state_dict()):
            print("FastEstimator-EncoderSaver: not saving the encoder: its weights are not finite (the run diverged)")
            return
        # A second fit() of the same estimator replaces what its own first fit() wrote.
        self.saved = save_encoder(self.model, self.path, overwrite=self.overwrite or self.saved is not None)
        print(f"FastEstimator-EncoderSaver: Saved encoder to {self.saved}")
