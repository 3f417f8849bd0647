"""Several nodes: two ``torchrun --nnodes 2 --nproc_per_node 1`` launches on localhost.

Each node's only rank has LOCAL_RANK 0, so anything that chose its writer by
local rank would write every file twice. Exactly one ``<tag>.pt`` per save
must appear, published by global rank 0, through the core pipeline and
through the WeNet stand-in launched as a user launches WeNet on two nodes.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import JOBS, REPO, STANDIN, TESTS, launch_env
from helpers import assert_state_dicts_equal, deepspeed_reference
from support.tiny_model import build_model
from support.tiny_training import ds_config

pytestmark = [pytest.mark.multirank, pytest.mark.usefixtures("deepspeed_trains")]

INJECT = TESTS / "inject"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(script, *args, records):
    """Both nodes' torchrun, concurrently; their outputs once both have ended."""
    port = free_port()
    env = launch_env(INJECT, WENET_HOOKS_TEST_WRITERS=str(records))
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--master_addr=127.0.0.1", f"--master_port={port}", str(script), *args],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, (proc, output) in enumerate(zip(nodes, outputs)):
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{output[-6000:]}"
    return outputs


def writes(records):
    """Every publication recorded: (global rank, local rank, node rank, file name)."""
    lines = [line.split() for path in sorted(records.glob("writes*.txt")) for line in path.read_text().splitlines()]
    return sorted(tuple(line) for line in lines)


def test_core_pipeline_on_two_nodes_writes_each_file_once_from_global_rank_0(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    launch_two_nodes(JOBS / "multinode_job.py", str(tmp_path / "out"), records=records)
    assert writes(records) == [("0", "0", "0", "step_2.pt"), ("0", "0", "0", "step_2.pt")]  # ZeRO-2, ZeRO-3
    for stage in (2, 3):
        model_dir = tmp_path / "out" / f"zero{stage}"
        assert sorted(p.name for p in model_dir.glob("*.pt*")) == ["step_2.pt"]
        ours = torch.load(str(model_dir / "step_2.pt"), map_location="cpu", weights_only=True)
        reference = deepspeed_reference(model_dir, "step_2", build_model())
        assert_state_dicts_equal({k: v for k, v in ours.items() if k in reference}, dict(reference))


def test_wenet_standin_on_two_nodes_writes_each_save_once_from_global_rank_0(tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    (tmp_path / "train.yaml").write_text(yaml.dump({"max_epoch": 2, "wenet_hooks": {"consolidate": {"enabled": True}}}))
    (tmp_path / "ds.json").write_text(json.dumps(ds_config(3)))
    exp = tmp_path / "exp"
    launch_two_nodes(STANDIN / "wenet" / "bin" / "train.py", "--train_engine", "deepspeed",
                     "--deepspeed_config", str(tmp_path / "ds.json"), "--deepspeed.save_states", "model+optimizer",
                     "--config", str(tmp_path / "train.yaml"), "--model_dir", str(exp), records=records)
    saved = sorted(p.name for p in exp.glob("*.pt*") if not p.is_symlink()) + sorted(
        p.name for p in exp.glob("*.optim"))
    assert saved == ["epoch_0.pt", "epoch_1.pt", "init.pt", "epoch_0.optim", "epoch_1.optim", "init.optim"]
    assert (exp / "final.pt").resolve() == exp / "epoch_1.pt"
    assert writes(records) == sorted(("0", "0", "0", name) for name in saved)  # global rank 0, once each
    assert not list(exp.glob("*.tmp"))
    for name in saved[:3]:  # the weights
        build_model(seed=5).load_state_dict(torch.load(str(exp / name), map_location="cpu", weights_only=True),
                                            strict=True)
