"""The model and data of the pytorch_image_classifier example: a small CNN on scikit-learn's
8x8 handwritten digits (1797 images that ship with scikit-learn, so nothing is downloaded).

This module sits beside ``run.py``, so it travels to the job with the ``@remote`` function by
value: the job needs neither this folder nor an install of it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DigitsCNN", "load_digits_tensors", "accuracy", "train"]


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions, a 2x2 pooling and two linear layers: 8x8x1 in, 10 logits out."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * 16, 64), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images as N x 1 x 8 x 8 floats in [0, 1], 25 % held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def train(log_dir: str, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict[str, Any]:
    """Train a DigitsCNN, writing TensorBoard events to ``log_dir``: the loss of every step, the
    train and test accuracy of every epoch, a grid of test images and the hyperparameters."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    writer = SummaryWriter(log_dir=log_dir)
    writer.add_images("test/images", x_test[:32], 0)
    step = 0
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in torch.randperm(len(y_train)).split(batch_size):
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            step += 1
            writer.add_scalar("train/loss", loss.item(), step)
        train_acc, test_acc = accuracy(model, x_train, y_train), accuracy(model, x_test, y_test)
        writer.add_scalar("train/accuracy", train_acc, epoch)
        writer.add_scalar("test/accuracy", test_acc, epoch)
        history.append(test_acc)
        print(f"epoch {epoch}/{epochs}: loss {loss.item():.4f}, train accuracy {train_acc:.3f}, "
              f"test accuracy {test_acc:.3f}", flush=True)
    writer.add_hparams({"epochs": epochs, "batch_size": batch_size, "lr": lr},
                       {"hparam/test_accuracy": history[-1]}, run_name=".")
    writer.close()
    return {"model": model, "test_accuracy": history[-1], "history": history, "steps": step,
            "train_images": len(y_train), "test_images": len(y_test)}
