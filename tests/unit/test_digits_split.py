"""The digits data without scikit-learn's import: the same samples, in the same split, as
scikit-learn's loader and `train_test_split` give (the oracle), and the worker does not pay
for importing scikit-learn."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch

from shardps.worker import data, digits_split


def test_the_kept_split_is_scikit_learns():
    train, test = digits_split.sklearn_split()
    assert (list(digits_split.TRAIN), list(digits_split.TEST)) == (train, test), \
        "scikit-learn's split changed: run `python -m shardps.worker.digits_split` and review"
    assert sorted(train + test) == list(range(1797)) and len(test) == 450


def test_the_bundled_csv_is_load_digits():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    got_x, got_y = data.bundled_digits()
    assert got_x.dtype == x.dtype and got_y.dtype == np.int64
    assert np.array_equal(got_x, x) and np.array_equal(got_y, y)


def test_digits_is_the_split_scikit_learn_makes():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split((x / 16.0).astype(np.float32), y, test_size=0.25,
                                              random_state=0, stratify=y)
    for image, shape in ((False, (-1, 64)), (True, (-1, 1, 8, 8))):
        split = data.digits(image)
        assert torch.equal(split.x_train, torch.from_numpy(x_tr).reshape(shape))
        assert torch.equal(split.x_test, torch.from_numpy(x_te).reshape(shape))
        assert torch.equal(split.y_train, torch.from_numpy(y_tr)) and split.y_train.dtype == torch.int64
        assert torch.equal(split.y_test, torch.from_numpy(y_te))


def test_loading_digits_does_not_import_scikit_learn():
    code = ("import sys\nfrom shardps.worker import data\ndata.digits()\n"
            "print(sorted(m for m in sys.modules if m == 'sklearn' or m.startswith(('sklearn.', 'scipy.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
