"""consolidate() on a plain module in one process: the state_dict contract, exactly."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_state_dicts_equal
from support.tiny_model import build_model
from wenet_hooks import ConsolidationError, consolidate
from wenet_hooks.dtypes import resolve_dtype


def test_same_keys_order_and_values_as_state_dict():
    model = build_model()
    result = consolidate(model)
    assert_state_dicts_equal(result, model.state_dict())
    assert list(result) == list(model.state_dict())
    assert "encoder.pe" not in result


def test_copies_own_their_storage_and_tied_keys_share_one():
    model = build_model()
    result = consolidate(model)
    tied = result["decoder.embed.0.weight"], result["decoder.output_layer.weight"]
    assert tied[0].untyped_storage().data_ptr() == tied[1].untyped_storage().data_ptr()
    with torch.no_grad():
        model.decoder.embed[0].weight.add_(1.0)  # training goes on after the save
    assert not torch.equal(result["decoder.embed.0.weight"], model.decoder.embed[0].weight)
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in result.values())


def test_dtype_casts_floating_tensors_only():
    result = consolidate(build_model(), dtype="fp16")
    assert result["encoder.embed.weight"].dtype == torch.float16
    assert result["encoder.norm.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("bad", ["f32", "float32", torch.int8, 3])
def test_unknown_dtype(bad):
    with pytest.raises(ValueError, match=rf"^dtype: expected one of fp32, bf16, fp16; found {bad!r}$"):
        resolve_dtype(bad)


def test_not_a_model():
    with pytest.raises(ConsolidationError, match="^expected a DeepSpeed engine or a torch.nn.Module; found dict$"):
        consolidate({})
