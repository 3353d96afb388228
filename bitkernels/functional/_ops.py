"""The one lazy loader of the Triton ops for the functional API."""


def triton_ops():
    """``bitkernels.ops``, imported on first use (it needs Triton, which is optional). An import statement, unlike
    importlib, is traced by torch.compile."""
    from .. import ops

    return ops
