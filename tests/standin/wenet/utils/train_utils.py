"""Stand-in for wenet/utils/train_utils.py (see tests/standin/README.md)."""

import os

import deepspeed
import torch
import yaml

from support.deepspeed_versions import WRITES_FOLDERS, deepspeed_version, zero_to_fp32


def add_deepspeed_args(parser):
    parser.add_argument("--deepspeed.save_states", dest="save_states", default="model_only",
                        choices=["model_only", "model+optimizer"])
    parser.add_argument("--local_rank", type=int, default=-1)
    return deepspeed.add_config_arguments(parser)


def init_distributed(args):
    deepspeed.init_distributed(dist_backend="gloo")
    return int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"])


def check_modify_and_save_config(args, configs, symbol_table):
    configs["train_engine"] = args.train_engine
    configs["model_dir"] = args.model_dir
    configs["save_states"] = args.save_states
    configs["dtype"] = "fp32"
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(args.model_dir, "train.yaml"), "w") as fout:
            fout.write(yaml.dump(configs))
    return configs


def save_model(model, info_dict):
    rank = int(os.environ.get("RANK", 0))
    tag = info_dict["tag"]
    model_dir = info_dict["model_dir"]
    save_model_path = os.path.join(model_dir, "{}.pt".format(tag))
    if info_dict["train_engine"] == "deepspeed":
        with torch.no_grad():
            model.save_checkpoint(save_dir=model_dir, tag=tag, client_state=info_dict)
            if info_dict["save_states"] == "model_only" and rank == 0:
                # WeNet calls convert_zero_checkpoint_to_fp32_state_dict(model_dir, save_model_path, tag=tag);
                # this stand-in calls it as each DeepSpeed version takes it (tests/support/deepspeed_versions.py),
                # max_shard_size=None where there is one so no huggingface_hub is needed.
                zero_to_fp32(model_dir, save_model_path, tag,
                             **({"max_shard_size": None} if deepspeed_version() >= WRITES_FOLDERS else {}))
                os.system("rm -rf {}/{}".format(model_dir, tag))
    elif rank == 0:
        torch.save(model.state_dict(), save_model_path)
    if rank == 0:
        with open("{}/{}.yaml".format(model_dir, tag), "w") as fout:
            fout.write(yaml.dump(info_dict))
