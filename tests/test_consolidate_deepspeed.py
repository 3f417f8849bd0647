"""consolidate() inside real 2-rank DeepSpeed training on the CPU (gloo).

One torchrun job trains every case for 3 optimizer steps, saves DeepSpeed's
sharded checkpoint and writes our file from the same step; the tests below
compare them. Cases not run, and why:

- fp16: DeepSpeed's CPU accelerator refuses it ("Type fp16 is not supported
  on your device"); the fp16 path is the same code as bf16 (FP16_Optimizer /
  ZeRO master weights) and runs on a GPU.
- ZeRO-0 with offload: offloading is a ZeRO feature; without ZeRO DeepSpeed
  ignores ``offload_optimizer``, so the case would repeat ZeRO-0.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_state_dicts_equal, deepspeed_reference, zero0_checkpoint_without_masters
from conftest import CASES, case_dir
from support.tiny_model import NEGATIVE_ZERO, build_model, make_batch

TAG = "step_3"
FROZEN = ["encoder.embed.weight", "encoder.embed.bias"]
TIED = ("decoder.embed.0.weight", "decoder.output_layer.weight")

# Optimizers whose fp32 masters are not partitioned: ZeRO-0 fp32 (torch's own
# AdamW) and FP16_Optimizer (ZeRO-0 bf16 on DeepSpeed >= 0.17).
UNPARTITIONED = ("AdamW", "DeepSpeedCPUAdam", "FusedAdam", "FP16_Optimizer", "FP16_UnfusedOptimizer")

NOT_RUN = [
    pytest.param("z2-fp16-nooffload", marks=pytest.mark.skip(reason="fp16 is refused by DeepSpeed on CPU")),
    pytest.param("z0-fp32-offload", marks=pytest.mark.skip(reason="offload needs ZeRO; ignored at stage 0")),
]


def load(path):
    return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)


@pytest.mark.parametrize("case", CASES + NOT_RUN)
def test_equals_deepspeed_reconstruction_bit_for_bit(matrix, case):
    folder = case_dir(matrix, case)
    ours = load(folder / f"{TAG}.pt")
    saved_bits = zero0_checkpoint_without_masters(folder / TAG)
    if saved_bits is not None:
        # DeepSpeed's checkpoint holds only the 16-bit weights (0.18.0 saves no optimizer state at
        # ZeRO-0): our fp32 masters must round to exactly those, and not be those.
        for key, value in saved_bits.items():
            if value.dtype in (torch.bfloat16, torch.float16) and key not in FROZEN:
                assert torch.equal(ours[key].to(value.dtype), value), key
        assert any(not torch.equal(ours[k], v.float()) for k, v in saved_bits.items() if v.is_floating_point())
        return
    reference = deepspeed_reference(folder, TAG, build_model())
    if case.startswith("z1-"):
        # zero_to_fp32 drops frozen parameters of ZeRO-1 checkpoints (see the test below).
        assert sorted(set(ours) - set(reference)) == sorted(FROZEN)
        ours = {k: v for k, v in ours.items() if k in reference}
    # DeepSpeed keeps frozen weights in training precision; ours are the same
    # values in the requested dtype (fp32).
    reference = {k: v.float() if k in FROZEN else v for k, v in reference.items()}
    assert_state_dicts_equal(ours, reference)


@pytest.mark.parametrize("case", CASES)
def test_bucketed_gather_equals_per_parameter_path(matrix, case):
    """The bucketed gather (default, and 1 KiB buckets that split parameters
    across collectives) gives the bytes DeepSpeed's per-parameter
    ``safe_get_full_fp32_param`` path gives, and is really used at ZeRO-1/2/3."""
    folder = case_dir(matrix, case)
    result = json.loads((folder / "result.json").read_text())
    if result["optimizer"] in UNPARTITIONED:
        assert result["bucketed"] == 0  # nothing is partitioned
    else:  # ZeRO-1/2/3, and BF16_Optimizer (ZeRO-0 bf16 on DeepSpeed <= 0.16: partitioned masters)
        assert result["bucketed"] == result["trainable"] > 0
        # The ranks exchanged their fragment lists once for the engine; the other gathers reused it.
        assert result["agreements"] == 1
        # Streamed to a file fragment by fragment, rank 0 held its receive buffer (one 1 KiB bucket)
        # and, for bf16, one fragment cast: not even a parameter (counted by the receiver, allocation
        # by allocation), whatever the parameters' sizes.
        fp32, bf16 = result["peak_bytes"]
        assert 0 < fp32 <= 1024 < bf16 <= 1024 + 1024 // 4 < result["largest_bytes"]
    ours = load(folder / f"{TAG}.pt")
    # What the hook writes (each fragment to its place in the file as it arrives) is what consolidate gives.
    assert_state_dicts_equal(load(folder / f"{TAG}.streamed.pt"), ours)
    assert_state_dicts_equal(load(folder / f"{TAG}.streamed_bf16.pt"), load(folder / f"{TAG}.bf16.pt"))
    assert_state_dicts_equal(load(folder / f"{TAG}.per_param.pt"), ours)
    assert_state_dicts_equal(load(folder / f"{TAG}.small_buckets.pt"), ours)
    assert_state_dicts_equal(load(folder / f"{TAG}.all_gather.pt"), ours)  # NCCL's collective, run on gloo


@pytest.mark.parametrize("case", CASES)
def test_keys_order_tied_and_frozen_like_the_module(matrix, case):
    ours = load(case_dir(matrix, case) / f"{TAG}.pt")
    fresh = build_model().state_dict()
    assert list(ours) == list(fresh)
    assert "encoder.pe" not in ours  # non-persistent buffer
    assert ours[TIED[0]].untyped_storage().data_ptr() == ours[TIED[1]].untyped_storage().data_ptr()
    assert ours["encoder.norm.num_batches_tracked"].dtype == torch.int64
    assert_state_dicts_equal({k: ours[k] for k in FROZEN}, initial_frozen(case))


def initial_frozen(case):
    """Frozen weights never change, but bf16 training casts them to bf16 and
    DeepSpeed keeps no fp32 copy of a weight it does not optimise."""
    fresh = build_model().state_dict()
    precision = torch.bfloat16 if "-bf16-" in case else torch.float32
    return {k: fresh[k].to(precision).float() for k in FROZEN}


@pytest.mark.parametrize("case", CASES)
def test_fresh_model_loads_strict_and_reproduces_engine_output(matrix, case):
    folder = case_dir(matrix, case)
    model = build_model(seed=99)  # other weights, so nothing passes by accident
    model.load_state_dict(torch.load(folder / f"{TAG}.pt", map_location="cpu", weights_only=True), strict=True)
    engine_out = torch.load(folder / "engine_out.pt", weights_only=True)
    feats, tokens, _ = make_batch(seed=1234)
    # bf16 training: the engine's module holds bf16 copies of the master
    # weights, so the fresh model is cast the same way before comparing.
    model = model.to(engine_out.dtype).eval()
    torch.set_num_threads(1)
    with torch.no_grad():
        out = model(feats.to(engine_out.dtype), tokens)
    assert torch.equal(out, engine_out)


@pytest.mark.parametrize("case", ["z2-bf16-nooffload", "z3-fp32-offload"])
def test_dtype_option_casts_floating_tensors_only(matrix, case):
    folder = case_dir(matrix, case)
    fp32 = load(folder / f"{TAG}.pt")
    bf16 = load(folder / f"{TAG}.bf16.pt")
    expected = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in fp32.items()}
    assert_state_dicts_equal(bf16, expected)


@pytest.mark.parametrize("case", [c for c in CASES if not c.startswith("z0-")])
def test_a_negative_zero_weight_keeps_its_sign_bit(matrix, case):
    """A -0.0 master (and training weight) is written as -0.0: the bytes DeepSpeed holds, not an all-reduce's +0.0."""
    folder = case_dir(matrix, case)
    ours = load(folder / "step_4.negative_zero.pt")
    value = ours[NEGATIVE_ZERO].view(-1)[0]
    assert value.item() == 0.0 and torch.signbit(value)
    reference = deepspeed_reference(folder, "step_4", build_model())  # the rest: step_4 as DeepSpeed saved it
    expected = {k: v for k, v in reference.items() if k in ours}
    expected[NEGATIVE_ZERO] = expected[NEGATIVE_ZERO].clone()
    expected[NEGATIVE_ZERO].view(-1)[0] = -0.0
    assert_state_dicts_equal({k: v for k, v in ours.items() if k in expected and k not in FROZEN},
                             {k: v for k, v in expected.items() if k not in FROZEN})


def test_zero1_frozen_weights_dropped_by_deepspeed_are_kept(matrix):
    folder = case_dir(matrix, "z1-fp32-nooffload")
    reference = deepspeed_reference(folder, TAG, build_model())
    ours = load(folder / f"{TAG}.pt")
    assert [k for k in FROZEN if k in reference] == []
    assert_state_dicts_equal({k: ours[k] for k in FROZEN}, initial_frozen("z1-fp32-nooffload"))
