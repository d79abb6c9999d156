"""recurra.ops.kv_keep: committing a draft path in a KV cache, against an independent oracle
(the kept slots gathered from an untouched copy) for plain and transposed layouts."""

import pytest
import torch

from recurra.ops import chunked_scan_compiled
from recurra.ops.kv_keep import keep_slots, keep_slots_reference


def make_cache(layers, S, transposed, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cache = []
    for _ in range(layers):
        k = torch.randn(2, 3, 5, S, generator=g, dtype=dtype)  # (B, H, D, S) storage
        k = k.transpose(2, 3) if transposed else k.transpose(2, 3).contiguous()
        v = torch.randn(2, 3, S, 5, generator=g, dtype=dtype)
        cache.append((k, v))
    return tuple(cache)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", [[0, 2, 5], [0, 1, 4], [0], [], [0, 1, 2], [0, 3, 4, 6]])
def test_equals_gathering_the_kept_slots(transposed, dtype, path):
    start, S = 9, 16
    for fn in (keep_slots, keep_slots_reference):
        cache = make_cache(3, S, transposed, dtype, seed=len(path))
        original = tuple((k.clone(), v.clone()) for k, v in cache)
        out = fn(cache, start, path)
        keep = list(range(start)) + [start + p for p in path]
        for (k, v), (k0, v0) in zip(out, original):
            assert k.shape[2] == v.shape[2] == start + len(path)
            assert torch.equal(k, k0[:, :, keep]) and torch.equal(v, v0[:, :, keep])
            assert k.stride() == k0.stride()  # a view of the same storage: the layout kept


def test_nothing_to_move_returns_the_cache_itself_and_bad_paths_raise():
    cache = make_cache(2, 12, True, torch.float32, 0)
    assert keep_slots(cache, 9, [0, 1, 2]) is cache
    assert keep_slots((), 3, [0]) == ()
    for bad in ([1, 2], [0, 2, 1], [0, 0]):
        with pytest.raises(ValueError, match="path must rise"):
            keep_slots(cache, 5, bad)


@pytest.mark.skipif(not chunked_scan_compiled.EXTENSION.available(),
                    reason="the C++ inference kernels cannot be built here")
def test_the_kernel_checks_its_slots():
    ext = chunked_scan_compiled.EXTENSION.load()
    cache = [t for kv in make_cache(1, 8, False, torch.float32, 0) for t in kv]
    with pytest.raises(RuntimeError, match="slots must"):
        ext.kv_keep(cache, [3], [2], 5)  # a move backwards
    with pytest.raises(RuntimeError, match="slots must"):
        ext.kv_keep(cache, [3], [9], 5)  # past the end
    with pytest.raises(RuntimeError, match="length"):
        ext.kv_keep(cache, [], [], 9)
