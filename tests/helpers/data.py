"""Skip markers for tests that read the shared data the product finds by default."""
from __future__ import annotations

import pytest

from erasure.datasets import CIFAR10_FILE
from erasure.io import data_dir

HAS_CIFAR10 = (data_dir(None) / CIFAR10_FILE).is_file()
needs_cifar10 = pytest.mark.skipif(not HAS_CIFAR10,
                                   reason="needs the shared CIFAR-10 npz ($ERASURE_DATA_DIR or ../shared/data)")
