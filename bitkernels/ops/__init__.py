"""Triton ops: each module holds its kernels, their launchers and autograd Functions, named as in
``bitkernels.reference``. Importing this package needs Triton."""
