"""Test setup: without CUDA the Triton kernels run in Triton's interpreter on CPU tensors (set before any import of
triton). Tests marked ``gpu`` use realistic shapes and run only where CUDA is available."""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Many random shapes would each trigger a full autotuning sweep: test the default config unless asked otherwise
# (`BITKERNELS_AUTOTUNE=1 pytest -m gpu` checks every tuned config at the realistic shapes).
os.environ.setdefault("BITKERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (realistic shapes)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return DEVICE
