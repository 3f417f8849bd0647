"""Test helpers: exact state-dict comparison and DeepSpeed's own reconstruction."""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional

import pytest
import torch

from support.deepspeed_versions import deepspeed_version


def state_dict_differences(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Every key missing, unexpected, of another dtype/shape, or not bit-identical."""
    problems = [f"missing {k}" for k in expected if k not in actual]
    problems += [f"unexpected {k}" for k in actual if k not in expected]
    for key in expected:
        if key not in actual:
            continue
        a, e = actual[key], expected[key]
        if a.dtype != e.dtype or a.shape != e.shape:
            problems.append(f"{key}: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}")
        elif not same_bits(a, e):
            problems.append(f"{key}: values differ (max abs diff {(a.double() - e.double()).abs().max():.3g})")
    return problems


def same_bits(a: torch.Tensor, e: torch.Tensor) -> bool:
    """Bit for bit: unlike torch.equal, -0.0 differs from 0.0 and NaN equals itself."""
    return torch.equal(a.contiguous().flatten().view(torch.uint8), e.contiguous().flatten().view(torch.uint8))


def assert_state_dicts_equal(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    problems = state_dict_differences(actual, expected)
    assert not problems, "\n".join(problems)


def deepspeed_reference(model_dir: Path, tag: str, model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """What DeepSpeed itself reconstructs from ``model_dir/tag``.

    ZeRO-1/2/3: ``get_fp32_state_dict_from_zero_checkpoint`` (zero_to_fp32).
    ZeRO-0 has no DeepSpeed converter; the reference is then read from the
    checkpoint's own fields: the module state, with trainable parameters taken
    from FP16_Optimizer's flat fp32 master group (bf16/fp16 training), which
    holds ``model``'s trainable parameters back to back in ``parameters()`` order.
    """
    ckpt = Path(model_dir) / tag
    if _zero0_partitioned(ckpt):
        return _bf16_optimizer_reference(ckpt, model)
    if any(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            reference = get_fp32_state_dict_from_zero_checkpoint(str(model_dir), tag=tag)
        return _as_documented(reference, model)
    from wenet_hooks.readers.safe_load import load_shard

    return _zero0_reference(load_shard(ckpt / "mp_rank_00_model_states.pt"), model)


def _as_documented(reference: "OrderedDict[str, torch.Tensor]", model: torch.nn.Module):
    """DeepSpeed's zero_to_fp32 before 0.19 casts every buffer to float (an int64
    ``num_batches_tracked`` comes back as float32: seen with 0.14.4 to 0.18.9); 0.19 keeps the dtype.
    The reference is put back in the module's dtype where that version says it
    casts, and only there, so a newer DeepSpeed doing it would still fail."""
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    for key, value in reference.items():
        if key in dtypes and not dtypes[key].is_floating_point and value.is_floating_point():
            assert deepspeed_version() < (0, 19), f"{key}: DeepSpeed {deepspeed_version()} cast it to {value.dtype}"
            assert torch.equal(value, value.round()), key
            reference[key] = value.to(dtypes[key])
    return reference


def _zero0_partitioned(ckpt: Path) -> bool:
    """ZeRO-0 bf16 on DeepSpeed <= 0.16: BF16_Optimizer's partitioned masters, which zero_to_fp32
    refuses ("is not a zero checkpoint")."""
    from wenet_hooks.readers.safe_load import load_shard

    files = sorted(ckpt.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return bool(files) and int(load_shard(files[0])["optimizer_state_dict"].get("zero_stage", 0) or 0) == 0


def _bf16_optimizer_reference(ckpt: Path, model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    """BF16_Optimizer saves, per rank, its slice of each group's flat fp32 masters
    (``single_partition_of_fp32_groups``): the group's trainable parameters back to back in
    ``parameters()`` order, padded at the end; the module state holds the rest."""
    from wenet_hooks.readers.safe_load import load_shard

    states = load_shard(ckpt / "mp_rank_00_model_states.pt")
    ref = OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in states["module"].items())
    files = sorted(ckpt.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda p: int(p.name.split("_")[4]))
    parts = [load_shard(f)["optimizer_state_dict"]["single_partition_of_fp32_groups"] for f in files]
    (flat,) = [torch.cat([p[g] for p in parts]) for g in range(len(parts[0]))]
    offset = 0
    for p in model.parameters():
        if p.requires_grad:
            for name, q in model.named_parameters(remove_duplicate=False):
                if q is p:
                    ref[name] = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
    return ref


def zero0_checkpoint_without_masters(ckpt: Path) -> Optional[dict]:
    """The module state of a ZeRO-0 16-bit checkpoint that holds no optimizer state (DeepSpeed 0.18.0
    saves ``optimizer: None`` there, so it has no fp32 masters to compare with); else None."""
    from wenet_hooks.readers.safe_load import load_shard

    path = Path(ckpt) / "mp_rank_00_model_states.pt"
    if not path.is_file() or any(Path(ckpt).glob("*optim_states.pt")):
        return None
    states = load_shard(path)
    sixteen_bits = any(v.dtype in (torch.bfloat16, torch.float16) for v in states["module"].values())
    return states["module"] if states.get("optimizer") is None and sixteen_bits else None


def _zero0_reference(states: dict, model: torch.nn.Module) -> "OrderedDict[str, torch.Tensor]":
    ref = OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in states["module"].items())
    flats = (states.get("optimizer") or {}).get("fp32_groups_flat")
    if flats is None:
        return ref
    (flat,) = flats
    offset = 0
    for p in model.parameters():
        if p.requires_grad:
            master = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
            for name, q in model.named_parameters(remove_duplicate=False):
                if q is p:
                    ref[name] = master
    assert offset == flat.numel(), f"layout mismatch: {offset} != {flat.numel()}"
    return ref


@contextlib.contextmanager
def small_disk(tmp_path, nbytes):
    """A tmpfs of ``nbytes`` at tmp_path/disk (skips where mounting is not permitted)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={nbytes}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def deepspeed_optimizer_reference(model_dir: Path, tag: str, key: str, scratch: Path) -> dict[str, torch.Tensor]:
    """Optimizer state ``key`` (``exp_avg``...) of every trainable parameter, reassembled by DeepSpeed's own
    ``zero_to_fp32`` from DeepSpeed's shards: a copy of ``model_dir/tag`` whose flat fp32 partitions are
    replaced by the same rank's flat ``key`` tensors (which share their layout). DeepSpeed strips the
    last rank's trailing padding from the fp32 partition it saves, so the moment is cut to its length."""
    from wenet_hooks.readers.safe_load import load_shard

    copy = scratch / tag
    copy.mkdir(parents=True, exist_ok=True)
    for shard in sorted((Path(model_dir) / tag).iterdir()):
        if not shard.name.endswith("optim_states.pt"):
            (copy / shard.name).symlink_to(shard.resolve())
            continue
        osd = load_shard(shard)["optimizer_state_dict"]
        name = "fp32_flat_groups" if "fp32_flat_groups" in osd else "single_partition_of_fp32_groups"
        base = osd.get("base_optimizer_state") if name == "single_partition_of_fp32_groups" else osd["optimizer_state_dict"]
        # What zero_to_fp32 reads of a shard, as plain data (DeepSpeed's own objects, its loss scaler, are left out).
        plain = {k: v for k, v in osd.items() if k in ("partition_count", "param_alignment_paddings", "group_paddings")}
        plain["zero_stage"] = int(getattr(osd["zero_stage"], "value", osd["zero_stage"]))
        plain[name] = [base["state"][g][key][: flat.numel()].clone() for g, flat in enumerate(osd[name])]
        torch.save({"optimizer_state_dict": plain}, copy / shard.name)
    (scratch / "latest").write_text(tag)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(scratch), tag=tag, exclude_frozen_parameters=True))
