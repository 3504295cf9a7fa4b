"""scikit-learn's 8x8 handwritten digits as tensors, with a fixed train/test split.

The split does not depend on the training seed, so the accuracies of different
runs and workflows are measured on the same held-out digits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SPLIT_SEED = 0        # the train/test split is the same for every run
TEST_FRACTION = 0.25  # 1,347 training and 450 test digits
PIXEL_MAX = 16.0      # the data set's pixels are integers 0..16


@dataclass
class Digits:
    train_x: torch.Tensor  # [N, 1, 8, 8] float32, pixels scaled to 0..1
    train_y: torch.Tensor  # [N] int64 labels 0..9
    test_x: torch.Tensor
    test_y: torch.Tensor


def _as_tensors(images, labels) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / PIXEL_MAX
    return x, torch.as_tensor(labels, dtype=torch.int64)


def load(limit: int | None = None) -> Digits:
    """The digits, split 75/25 stratified by class. `limit` keeps at most that
    many training and that many test digits (for quick runs and tests)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit("the digits scripts need scikit-learn: pip install scikit-learn "
                         "(or pip install 'convdsl[examples]')") from None
    data = load_digits()
    train_images, test_images, train_labels, test_labels = train_test_split(
        data.images, data.target, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
        stratify=data.target)
    train_x, train_y = _as_tensors(train_images, train_labels)
    test_x, test_y = _as_tensors(test_images, test_labels)
    if limit is not None:
        train_x, train_y = train_x[:limit], train_y[:limit]
        test_x, test_y = test_x[:limit], test_y[:limit]
    return Digits(train_x, train_y, test_x, test_y)
