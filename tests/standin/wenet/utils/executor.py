"""Stand-in for wenet/utils/executor.py (see tests/standin/README.md)."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wenet.utils.train_utils import save_model
from support.tiny_model import make_batch


def batch_loss(model, step):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    feats, tokens, targets = make_batch(step * world + rank)
    logits = model(feats, tokens)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


class Executor:
    def __init__(self, global_step=0):
        self.step = global_step + 1
        self.losses = []

    def train(self, model, configs, steps_per_epoch):
        model.train()
        save_interval = configs.get("save_interval", sys.maxsize)
        for _ in range(steps_per_epoch):
            loss = batch_loss(model, self.step)
            model.backward(loss)
            model.step()
            self.losses.append((self.step, loss.item()))
            if (self.step + 1) % save_interval == 0 and self.step != 0:
                dist.barrier()
                loss_dict = self.cv(model)
                model.train()
                info_dict = dict(configs, tag="step_{}".format(self.step), step=self.step, loss_dict=loss_dict)
                save_model(model, info_dict)
                dist.barrier()
            self.step += 1

    def cv(self, model):
        model.eval()
        with torch.no_grad():
            loss = batch_loss(model, 10_000).item()
        return {"loss": loss}
