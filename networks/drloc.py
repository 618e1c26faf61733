"""Dense relative localization: an auxiliary loss for ViTs trained on small data sets.

Follows Liu et al. 2021, "Efficient Training of Visual Transformers with Small Datasets" (NeurIPS; yhlleo/VTs-Drloc):
from the last layer's grid of patch tokens, pairs of tokens are drawn at random and a small MLP on each pair's two
embeddings predicts their offset on the grid (rows, columns), with an L1 loss. The task needs spatial knowledge that
the classification loss alone does not ask for, and is learnt from the same images without labels. As in the authors'
code and training script (`--drloc_mode l1 --use_abs`): uniform pairs (with replacement), the raw transformer
outputs (before the final norm), the absolute row and column offsets in grid units, L1 regression. Two differences:
their MLP is 2 x 512 wide, this one em_dim / 2 (which keeps the apphub-size ViT within 3.5M parameters); and their
script ramps the loss's weight up over 20 epochs and then down, where here it is constant (a weight that changes
between epochs would be one more device tensor for the captured step). Used in training only.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

PAIRS = 64  # token pairs drawn per image and step (the authors' command-line default)


class DenseRelativeLoc(nn.Module):
    """The pair MLP and its loss: patch tokens [B, side * side, D] (row-major grid) -> a scalar L1 loss."""
    def __init__(self, em_dim: int, side: int, pairs: int = PAIRS) -> None:
        super().__init__()
        self.side, self.pairs = side, pairs
        hidden = max(em_dim // 2, 1)
        self.mlp = nn.Sequential(nn.Linear(2 * em_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        if n != self.side * self.side:
            raise ValueError(f"DenseRelativeLoc expects {self.side} x {self.side} = {self.side**2} patch tokens, "
                             f"got {n}")
        # drawn on the device, so a CUDA graph draws new pairs at every replay
        first, second = torch.randint(n, (2, b, self.pairs), device=tokens.device)  # [B, P] each
        pick = (lambda idx: tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, d)))  # [B, P] -> [B, P, D]
        predicted = self.mlp(torch.cat([pick(first), pick(second)], dim=-1))  # [B, P, 2]
        offset = torch.stack([first // self.side - second // self.side, first % self.side - second % self.side],
                             dim=-1).abs()  # [B, P, 2]: how many rows and columns apart
        return F.l1_loss(predicted.float(), offset.float())
