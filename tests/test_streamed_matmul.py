"""recurra.ops.streamed_matmul: x @ W for a few rows, equal to torch's product, each row's result
independent of the rows computed with it; LlamaLM's use of it."""

import pytest
import torch

from recurra.ops import chunked_scan_compiled
from recurra.ops.streamed_matmul import MAX_ROWS, serves, streamed_matmul

pytestmark = pytest.mark.skipif(not chunked_scan_compiled.EXTENSION.available(),
                                reason="the C++ inference kernels cannot be built here")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("M,K,N", [(1, 576, 960), (3, 37, 5), (8, 100, 300), (16, 9, 2500),
                                   (5, 1, 17)])
def test_equals_torch_matmul(dtype, M, K, N):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen, dtype=dtype)
    W = torch.randn(K, N, generator=gen, dtype=dtype)
    tol = {"atol": 1e-11, "rtol": 1e-11} if dtype == torch.float64 else {"atol": 1e-4,
                                                                         "rtol": 1e-5}
    torch.testing.assert_close(streamed_matmul(x, W), x @ W, **tol)


@pytest.mark.parametrize("K,N", [(576, 960), (61, 300), (1536, 70)])
def test_a_rows_result_does_not_depend_on_the_other_rows(K, N):
    """Bitwise: each row alone, and inside batches of every size up to MAX_ROWS."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(MAX_ROWS, K, generator=gen)
    W = torch.randn(K, N, generator=gen)
    alone = torch.cat([streamed_matmul(x[i:i + 1], W) for i in range(MAX_ROWS)])
    for m in range(1, MAX_ROWS + 1):
        assert torch.equal(streamed_matmul(x[:m], W), alone[:m]), f"{m} rows"
    assert torch.equal(streamed_matmul(x.view(-1, 8, K), W), alone.view(-1, 8, N))


def test_serves_only_small_no_grad_cpu_products():
    W = torch.randn(8, 4)
    assert serves(torch.randn(1, 3, 8), W)
    assert not serves(torch.randn(MAX_ROWS + 1, 8), W)
    assert not serves(torch.randn(2, 8, dtype=torch.float64), W)  # mixed dtypes
    Wg = W.clone().requires_grad_()
    assert not serves(torch.randn(2, 8), Wg)
    with torch.no_grad():
        assert serves(torch.randn(2, 8), Wg)


def test_packed_copy_is_kept_and_follows_in_place_changes():
    from recurra.ops.streamed_matmul import pack_panels, packed

    gen = torch.Generator().manual_seed(2)
    W = torch.randn(40, 70, generator=gen)
    first = packed(W)
    assert packed(W) is first  # cached
    first_t = packed(W, transposed=True)  # kept beside it: W.T's panels
    assert packed(W, transposed=True) is first_t and packed(W) is first
    assert torch.equal(first_t, pack_panels(W.t()))
    panels = pack_panels(W)
    assert panels.shape == (3, 40, 32)
    torch.testing.assert_close(panels.transpose(0, 1).reshape(40, 96)[:, :70], W, atol=0, rtol=0)
    assert panels[-1, :, 6:].abs().sum() == 0  # the last panel's padding
    x = torch.randn(3, 40, generator=gen)
    with torch.no_grad():
        W.mul_(2.0)  # in place: a new version
    assert packed(W) is not first
    assert torch.equal(packed(W, transposed=True), pack_panels(W.t()))  # follows too
    torch.testing.assert_close(streamed_matmul(x, W), x @ W, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="share K"):
        streamed_matmul(torch.randn(2, 41), W)
