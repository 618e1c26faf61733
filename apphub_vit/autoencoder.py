"""An MNIST autoencoder with a 3-dimensional code, as FastEstimator ops.

The classic fully connected autoencoder (Hinton & Salakhutdinov 2006, in the small form of the Keras and PyTorch
autoencoder tutorials): 784 -> 128 -> 3 -> 128 -> 784 with ReLU hidden layers, trained to reconstruct its input with
the mean squared error and Adam 1e-3. Encoder and decoder are separate models, each a ModelOp with its own UpdateOp on
the same reconstruction loss, so the encoder can be saved and used alone: its 3-d code is an embedding of the digit
that a user can plot (the run writes the eval set's codes and labels to `mnist_codes.npz`).

    fastestimator train apphub_vit/autoencoder.py --data_dir ../shared/data/mnist
    fastestimator train apphub_vit/autoencoder.py --dataset synthetic --epochs 2

The eval log's `mse` is the reconstruction loss on unseen digits (pixels in [0, 1]).
"""
import os
from typing import List, Optional

import fastestimator as fe
import numpy as np
import torch
from fastestimator.op.tensorop.loss import MeanSquaredError
from fastestimator.op.tensorop.model import ModelOp, UpdateOp
from fastestimator.trace import Trace
from fastestimator.util.data import Data
from fastestimator.util.util import to_number

from apphub_vit import options
from apphub_vit.common import best_model_file, finish_estimator, load_weights, run_options, start_run, synthetic_sizes
from apphub_vit.mnist_data import load_mnist
from apphub_vit.runs import atomic_path, build_model
from networks.baselines import MnistDecoder, MnistEncoder
from pipelines.mnist import mnist_pipeline

CODES_FILE = "mnist_codes.npz"


class CodeRecorder(Trace):
    """Keeps the eval set's codes and labels of the latest eval epoch and writes them to `save_dir/mnist_codes.npz`
    at the end of the run ({"code": [N, 3], "y": [N]}), ready for a 3-d scatter plot."""
    def __init__(self, code_key: str, label_key: str, save_dir: str) -> None:
        super().__init__(inputs=[code_key, label_key], mode="eval")
        self.path = os.path.join(save_dir, CODES_FILE)
        self.codes: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []

    def on_epoch_begin(self, data: Data) -> None:
        self.codes, self.labels = [], []

    def on_batch_end(self, data: Data) -> None:
        self.codes.append(to_number(data[self.inputs[0]]))
        self.labels.append(to_number(data[self.inputs[1]]))

    def on_end(self, data: Data) -> None:
        if self.codes:
            with atomic_path(self.path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz"
                np.savez(f, code=np.concatenate(self.codes), y=np.concatenate(self.labels))
            print(f"FastEstimator-CodeRecorder: saved {sum(len(c) for c in self.codes)} codes to {self.path}")


def get_estimator(epochs: int = 10,
                  batch_size: int = 128,
                  train_steps_per_epoch: Optional[int] = None,
                  eval_steps_per_epoch: Optional[int] = None,
                  save_dir: Optional[str] = None,
                  data_dir: Optional[str] = None,
                  dataset: str = "mnist",
                  lr: float = 1e-3,
                  code_dim: int = 3,
                  hidden: int = 128,
                  weights_path: Optional[str] = None,
                  overwrite: bool = False,
                  resume: bool = False,
                  seed: Optional[int] = None,
                  num_process: Optional[int] = None,
                  log_steps: int = 100,
                  synthetic_size: Optional[List[int]] = None) -> fe.Estimator:
    """The MNIST autoencoder Estimator.

    Args:
        epochs: Training epochs.
        batch_size: Images per step.
        train_steps_per_epoch: Cap on steps per epoch (None: the whole training set).
        eval_steps_per_epoch: Cap on eval steps (None: the whole eval set).
        save_dir: Output folder (None: a new `runs/autoencoder-<time>`).
        data_dir: A local folder with MNIST IDX files or mnist.npz (see `apphub_vit.mnist_data`).
        dataset: "mnist" (real digits) or "synthetic" (rendered digits, no download).
        lr: Adam learning rate (for both models).
        code_dim: Size of the code (the embedding); 3 in the recipe.
        hidden: Width of the hidden layers; 128 in the recipe.
        weights_path: A run folder holding `mnist_encoder_best_mse.pt` and `mnist_decoder_best_mse.pt` (or either
            file) to start from, e.g. for `fastestimator test`.
        overwrite: Replace outputs an earlier run left in save_dir (otherwise the run refuses to start).
        resume, seed: As `apphub_vit.pretrain.get_estimator`.
        num_process: Pipeline worker processes (None: FastEstimator's default, one per CPU; 0: in the main process).
        log_steps: Log the training loss every this many steps.
        synthetic_size: [train, eval] image counts for dataset="synthetic" (default 8,000 / 2,000).
    """
    run = run_options(epochs, batch_size, train_steps_per_epoch, eval_steps_per_epoch, log_steps, synthetic_size)
    lr = options.number("lr", lr, low_open=True)
    code_dim, hidden = options.positive_int("code_dim", code_dim), options.positive_int("hidden", hidden)
    names = {"mnist_encoder": lambda: MnistEncoder(code_dim, hidden),
             "mnist_decoder": lambda: MnistDecoder(code_dim, hidden)}
    folder = start_run("autoencoder", save_dir, [best_model_file(n, "mse") for n in names] + [CODES_FILE], overwrite,
                       resume, seed)
    save_dir = folder.save_dir
    saved = weights_path  # the folder of both best-model files
    if saved is not None and not os.path.isdir(saved):
        saved = os.path.dirname(os.path.abspath(saved))

    def builder(name: str):
        def model_fn() -> torch.nn.Module:
            model = names[name]()
            if saved is not None:
                load_weights(model, os.path.join(saved, best_model_file(name, "mse")))
            return model
        return model_fn

    encoder, decoder = (build_model(model_fn=builder(n), optimizer_fn=lambda p: torch.optim.Adam(p, lr=lr),
                                    model_name=n) for n in names)

    # 1. pipeline: x is [784] floats in [0, 1], both the input and the reconstruction target; the held-out digits are
    #    both the eval and the test data
    train_data, eval_data = load_mnist(dataset, data_dir, **synthetic_sizes(run["synthetic_size"]))
    pipeline = mnist_pipeline(train_data, eval_data, batch_size=run["batch_size"], flat=True, num_process=num_process,
                              test_data=eval_data)

    # 2. network
    network = fe.Network(ops=[
        ModelOp(model=encoder, inputs="x", outputs="code"),
        ModelOp(model=decoder, inputs="code", outputs="x_hat"),
        MeanSquaredError(inputs=("x_hat", "x"), outputs="mse"),
        # Two optimizers on one loss: the same update as one Adam over both models, but each model is its own
        # FastEstimator model (saved, loaded and reused separately).
        UpdateOp(model=encoder, loss_name="mse"),
        UpdateOp(model=decoder, loss_name="mse"),
    ])

    # 3. estimator
    config = dict(data_dir=data_dir, epochs=run["epochs"], batch_size=run["batch_size"], lr=lr, code_dim=code_dim,
                  hidden=hidden, synthetic_size=run["synthetic_size"], weights_path=weights_path)
    estimator = finish_estimator(
        pipeline=pipeline, network=network, models=[encoder, decoder], app="mnist_autoencoder", folder=folder,
        dataset="MNIST" if dataset == "mnist" else "synthetic digits", hparams=config, epochs=run["epochs"],
        train_steps_per_epoch=run["train_steps_per_epoch"], eval_steps_per_epoch=run["eval_steps_per_epoch"],
        log_steps=run["log_steps"], best=("mse", "min"), loss_key="mse",
        traces=[CodeRecorder("code", "y", save_dir)])
    estimator.encoder, estimator.decoder = encoder, decoder
    return estimator


if __name__ == "__main__":
    get_estimator().fit()
