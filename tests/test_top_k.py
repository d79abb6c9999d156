"""recurra.ops.top_k: each row's k largest entries, held to a stable descending sort."""

import pytest
import torch

from recurra.ops import chunked_scan_compiled
from recurra.ops.top_k import (
    argmax,
    top_k,
    top_k_probabilities,
    top_k_probabilities_reference,
    top_k_reference,
)

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


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-5), (torch.float64, 3e-5)])  # degree-6 exp
@pytest.mark.parametrize("rows,n,k", [(8, 49152, 8), (3, 37, 5), (2, 5, 5), (1, 16, 1)])
def test_probabilities_equal_the_softmax(dtype, tol, rows, n, k):
    gen = torch.Generator().manual_seed(n * k)
    x = torch.randn(rows, n, generator=gen, dtype=dtype) * 4
    idx, probs = top_k_probabilities(x, k)
    assert torch.equal(idx, top_k_reference(x, k))
    expected = torch.softmax(x.double(), -1).gather(-1, idx)  # an independent float64 softmax
    assert probs.dtype == dtype
    assert torch.allclose(probs.double(), expected, rtol=tol, atol=0)
    ref_idx, ref_probs = top_k_probabilities_reference(x, k)  # the fallback path agrees
    assert torch.equal(ref_idx, idx) and torch.allclose(ref_probs.double(), expected, rtol=tol)
    with pytest.raises(ValueError, match="k must be"):
        top_k_probabilities(x, n + 1)


def test_argmax_equals_torch_argmax_ties_included():
    gen = torch.Generator().manual_seed(1)
    # lengths around the kernel's vector widths (16 floats, 8 doubles): whole vectors, a tail
    for shape in [(1, 49152), (8, 49152), (3, 4, 33), (5, 1), (9, 16), (9, 17), (9, 64), (9, 71)]:
        x = torch.randint(0, 5, shape, generator=gen).float()  # many tied maxima
        assert torch.equal(argmax(x), x.argmax(-1))
        y = torch.randn(shape, generator=gen, dtype=torch.float64)
        assert torch.equal(argmax(y), y.argmax(-1))
    x = torch.full((2, 50), -float("inf"))
    x[1, 7] = 0.0
    assert argmax(x).tolist() == x.argmax(-1).tolist() == [0, 7]
    x = torch.zeros(4, 37)  # the maximum tied across lanes and in the tail
    x[0, [5, 21]] = 1.0
    x[1, [21, 5]] = 1.0
    x[2, [36, 35]] = 1.0
    x[3, [3, 19, 35]] = 1.0
    assert argmax(x).tolist() == x.argmax(-1).tolist() == [5, 5, 35, 3]
    assert argmax(x.double()).tolist() == [5, 5, 35, 3]
    half = torch.randn(3, 40).bfloat16()  # a dtype the kernel does not take: torch's argmax
    assert torch.equal(argmax(half), half.argmax(-1))
