"""recurra.ops.top_k: each row's k largest entries, held to a stable descending sort."""

import pytest
import torch

from recurra.ops import chunked_scan_compiled
from recurra.ops.top_k import top_k, top_k_reference

pytestmark = pytest.mark.skipif(not chunked_scan_compiled.EXTENSION.available(),
                                reason="the C++ inference kernels cannot be built here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n,k", [(1, 49152, 8), (8, 1000, 8), (3, 37, 5), (2, 5, 5),
                                      (5, 17, 1), (1, 16, 16)])
def test_equals_a_stable_sort(dtype, rows, n, k):
    gen = torch.Generator().manual_seed(n + k)
    x = torch.randn(rows, n, generator=gen, dtype=dtype)
    assert torch.equal(top_k(x, k), top_k_reference(x, k))
    assert torch.equal(top_k(x, k), x.topk(k).indices)  # distinct values: torch.topk agrees


def test_ties_go_to_the_lower_index_and_minus_infinity_is_kept_last():
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (6, 300), generator=gen).float()  # many ties
    x[2, 5:] = -float("inf")  # only 5 finite entries, k = 8
    x[3] = 1.0  # all equal
    assert torch.equal(top_k(x, 8), top_k_reference(x, 8))
    assert top_k(x, 8)[3].tolist() == list(range(8))
    assert top_k(x.view(2, 3, 300), 3).shape == (2, 3, 3)


def test_bad_k_and_the_reference_path():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="k must be"):
        top_k(x, 11)
    with pytest.raises(ValueError, match="k must be"):
        top_k(x, 0)
    xg = x.clone().requires_grad_()  # needs grad: the reference sort, the same answer
    assert torch.equal(top_k(xg, 4), top_k(x, 4))
