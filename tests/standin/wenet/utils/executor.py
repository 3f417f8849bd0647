"""Stand-in for wenet/utils/executor.py (see tests/standin/README.md)."""

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wenet.utils.train_utils import save_model
from support.tiny_model import make_batch


def batch_loss(model, index):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    feats, tokens, targets = make_batch(index * world + rank)
    logits = model(feats, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class Executor:
    def __init__(self, global_step=0):
        self.step = global_step + 1
        self.losses = []

    def train(self, model, configs, steps_per_epoch):
        model.train()
        # As WeNet's executor: ONE info_dict per epoch, rewritten at every batch, saved from as it stands.
        info_dict = copy.deepcopy(configs)
        save_interval = configs.get("save_interval", sys.maxsize)
        for batch_idx in range(steps_per_epoch):
            info_dict["tag"] = "TRAIN"
            info_dict["step"] = self.step
            info_dict["batch_idx"] = batch_idx
            # Epoch mode: WeNet's data loader gives each epoch the same batches whatever the step counter
            # (a resume from epoch_N continues with epoch N+1's); steps mode keys them by step here.
            index = self.step if "save_interval" in configs else 1000 * (1 + configs["epoch"]) + batch_idx
            loss = batch_loss(model, index)
            info_dict["loss_dict"] = {"loss": loss}  # a tensor, as WeNet's batch_forward leaves it
            model.backward(loss)
            model.step()
            self.losses.append((self.step, loss.item()))
            if (self.step + 1) % save_interval == 0 and self.step != 0:
                dist.barrier()
                loss_dict = self.cv(model)
                model.train()
                info_dict.update({"tag": "step_{}".format(self.step), "loss_dict": loss_dict})
                save_model(model, info_dict)
                dist.barrier()
            self.step += 1

    def cv(self, model):
        model.eval()
        with torch.no_grad():
            loss = batch_loss(model, 10_000).item()
        return {"loss": loss}
