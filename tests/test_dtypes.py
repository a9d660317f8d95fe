"""The dtype rules shared by the op families."""

import pytest
import torch

from ncfast._dtypes import accumulation_dtype, dtype_name


@pytest.mark.parametrize("dtype,accumulated,name", [
    (torch.float64, torch.float64, "float64"),
    (torch.float32, torch.float32, "float32"),
    (torch.bfloat16, torch.float32, "bfloat16"),
    (torch.float16, torch.float32, "float16"),
])
def test_accumulation_dtype_and_name(dtype, accumulated, name):
    assert accumulation_dtype(dtype) == accumulated
    assert dtype_name(dtype) == name
