"""Stand-in for wenet/bin/train.py (see tests/standin/README.md).

Extra knobs for the tests, through the environment: STANDIN_STEPS (steps per
epoch, default 2), STANDIN_LOSSES (file to which rank 0 appends its losses).
"""

import argparse
import json
import logging
import os
import re

import torch
import torch.distributed as dist
import yaml

from wenet.utils.executor import Executor
from wenet.utils.train_utils import add_deepspeed_args, check_modify_and_save_config, init_distributed, save_model
from support.tiny_model import build_model


def get_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_engine", default="torch_ddp", choices=["torch_ddp", "torch_fsdp", "deepspeed"])
    parser.add_argument("--config", required=True)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--override_config", action="append", default=[])
    parser = add_deepspeed_args(parser)
    return parser.parse_args()


def override_config(configs, override_list):
    for item in override_list:
        key, value = item.split()
        node, *path = configs, *key.split(".")
        for part in path[:-1]:
            node = node[part]
        old = node[path[-1]]
        node[path[-1]] = value in ("true", "True") if isinstance(old, bool) else type(old)(value)
    return configs


def load_checkpoint(model, path):
    checkpoint = torch.load(path, map_location="cpu", mmap=True)
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    for key in missing:
        print("missing tensor: {}".format(key))
    for key in unexpected:
        print("unexpected tensor: {}".format(key))
    # As WeNet's own (wenet/utils/checkpoint.py): for a name not ending in .pt this is the model file itself.
    info_path = re.sub(".pt$", ".yaml", path)
    configs = {}
    if os.path.exists(info_path):
        with open(info_path) as fin:
            configs = yaml.load(fin, Loader=yaml.FullLoader)
    return configs


def main():
    args = get_args()
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(levelname)s %(message)s")
    with open(args.config) as fin:
        configs = yaml.load(fin, Loader=yaml.FullLoader)
    configs = override_config(configs, args.override_config)
    _, _, rank = init_distributed(args)
    os.makedirs(args.model_dir, exist_ok=True)
    configs = check_modify_and_save_config(args, configs, symbol_table=None)

    model = build_model()
    infos = load_checkpoint(model, args.checkpoint) if args.checkpoint else {}
    with open(args.deepspeed_config) as fin:
        ds_config = json.load(fin)
    import deepspeed

    model, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                          model_parameters=[p for p in model.parameters() if p.requires_grad])
    save_model(model, info_dict=dict(configs, tag="init"))

    executor = Executor(global_step=infos.get("step", -1))
    start_epoch = infos.get("epoch", 0) + int("epoch_" in infos.get("tag", ""))
    end_epoch = configs.get("max_epoch", 100) if "save_interval" not in configs else 1  # WeNet's own line
    final_epoch = None
    for epoch in range(start_epoch, end_epoch):
        configs["epoch"] = epoch
        dist.barrier()
        executor.train(model, configs, int(os.environ.get("STANDIN_STEPS", "2")))
        dist.barrier()
        loss_dict = executor.cv(model)
        info_dict = dict(configs, epoch=epoch, step=executor.step, tag="epoch_{}".format(epoch), loss_dict=loss_dict)
        save_model(model, info_dict=info_dict)
        final_epoch = epoch

    if rank == 0 and os.environ.get("STANDIN_LOSSES"):
        with open(os.environ["STANDIN_LOSSES"], "a") as f:
            f.writelines(f"{step} {loss!r}\n" for step, loss in executor.losses)
    if final_epoch is not None and rank == 0:
        final_model_path = os.path.join(args.model_dir, "final.pt")
        os.remove(final_model_path) if os.path.exists(final_model_path) else None
        os.symlink("{}.pt".format(final_epoch), final_model_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
