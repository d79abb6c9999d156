"""Package-level promises: a cheap import, and every registered layer honours the basics."""

import subprocess
import sys

import pytest
import torch

import recurra.layers as L


def test_import_recurra_does_not_import_torch():
    code = "import sys, recurra; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", L.available())
def test_every_registered_layer_works_with_defaults(name):
    torch.manual_seed(0)
    layer = L.build(name, 64)  # every layer's defaults must work at d_model=64
    x = torch.randn(2, 12, 64)
    y, state = layer(x)
    assert y.shape == (2, 12, 64)
    assert isinstance(state, tuple) and all(isinstance(s, torch.Tensor) for s in state)
    assert torch.isfinite(y).all()
    if layer.causal:
        # the state carries the sequence on: two halves == one pass
        y1, s1 = layer(x[:, :6])
        y2, _ = layer(x[:, 6:], s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-4, rtol=1e-4)


def test_unknown_layer_name_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="unknown layer name 'nope'.*available layers: .*lstm"):
        L.build("nope", 8)


def test_no_layer_module_fails_to_import():
    from recurra.layers.registry import broken_modules

    assert broken_modules() == {}
