"""Reusable buffers: the tensors handed out, and when their memory is reused."""

import torch

from fishmerge.workspace import Workspace


def test_a_buffer_grows_to_the_largest_request_and_is_then_reused():
    workspace = Workspace()
    first = workspace.tensor("a", (4, 3))
    assert first.shape == (4, 3) and first.dtype == torch.float32 and first.is_contiguous()
    smaller = workspace.tensor("a", (2, 5), torch.bfloat16)
    assert smaller.shape == (2, 5) and smaller.dtype == torch.bfloat16
    assert smaller.data_ptr() == first.data_ptr()  # same memory, viewed with another shape and dtype
    larger = workspace.tensor("a", (10, 10))
    assert larger.shape == (10, 10) and larger.data_ptr() != first.data_ptr()
    assert workspace.tensor("b", (4, 3)).data_ptr() != workspace.tensor("a", (4, 3)).data_ptr()


def test_scalars_and_empty_tensors():
    workspace = Workspace()
    assert workspace.tensor("s", ()).shape == ()
    assert workspace.tensor("e", (0, 7)).shape == (0, 7)
