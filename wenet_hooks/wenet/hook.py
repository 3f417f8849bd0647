"""What the wrapped ``save_model`` does at each WeNet save.

``check_modify_and_save_config`` (called by train.py right after reading the
yaml, before the model is built) composes and validates the ``wenet_hooks``
section once, so a bad section stops the run before any step. Then, at each
``save_model(model, info_dict)`` with the hook active:

- ``save_states: model+optimizer``: WeNet's own save runs (DeepSpeed's sharded
  ``<tag>/`` and ``<tag>.yaml``), then every rank's copy of its partitions of
  the masters and of the optimizer state to host memory, with the check of its
  masters against its training weights, is taken in the background before the
  next optimizer step (which waits for it); the gathers and rank 0's writing of
  the verified ``<tag>.pt`` and ``<tag>.optim`` follow there (except at WeNet's
  last save, after which it destroys the process groups); once they verified,
  retention may remove older folders. The next save first settles that work.
- ``save_states: model_only``: nothing sharded is written, read or deleted;
  the ``.pt`` comes straight from memory and ``<tag>.yaml`` is written as WeNet
  writes it.
- ``sharded: false``: WeNet's own save is not called; the files are the save,
  written in the background (``model_only`` too), ``<tag>.yaml`` after them.

At the ``init`` save, right after ``deepspeed.initialize``, a run started with
``--checkpoint X.pt`` that has ``X.optim`` beside it is first restored
exactly (:mod:`wenet_hooks.resume`).

Inactive (section absent, ``enabled: false``, or another ``train_engine``),
the original ``save_model`` runs untouched.
"""

from __future__ import annotations

import atexit
import copy
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from wenet_hooks.background import BackgroundWriter
from wenet_hooks.compat import describe_environment, environment_problems
from wenet_hooks.dist import Failure, all_reports, background_group, first_failure, get_rank, is_rank0, log_rank0
from wenet_hooks.errors import ResumeChoiceError, SaveError
from wenet_hooks.file.commit import committed, newest_committed, record_path
from wenet_hooks.file.optimizer_file import find_optimizer_file, optimizer_path
from wenet_hooks.resume import restore
from wenet_hooks.save import save_consolidated, settle_background
from wenet_hooks.wenet.config import SECTION, ConsolidateConfig, OnError, Resume, compose_section
from wenet_hooks.wenet.files import FinalLink, ShardedRetention, write_info_yaml

logger = logging.getLogger(__name__)

DEEPSPEED = "deepspeed"
MODEL_ONLY = "model_only"
INIT_TAG = "init"  # WeNet's save right after deepspeed.initialize
WENET_MAX_EPOCH = 100  # train.py's default for max_epoch


class _Session:
    """Per-process state: the validated config, the background writer, retention and final.pt."""

    def __init__(self) -> None:
        self.configured = False
        self.active: Optional[ConsolidateConfig] = None
        self.installed_into: list[str] = []  # where patch bound the wrappers, for the first log line
        self.checkpoint: Optional[str] = None  # WeNet's --checkpoint, if it resumes
        self.resumed = False
        self.writer = BackgroundWriter()
        self.retention = ShardedRetention()
        self.final_link = FinalLink()
        self._exit_report = False

    def activate(self, config: Optional[ConsolidateConfig]) -> None:
        self.configured, self.active = True, config
        if config is not None and not self._exit_report:
            # Registered once the hook is active, not at import: importing has no side effects.
            atexit.register(self.report_last_write)
            self._exit_report = True

    def report_last_write(self) -> None:
        """At exit, after the interpreter waited for the writer thread: say if the last write failed."""
        failed = self.writer.wait()
        if failed is None:
            return
        if self.active is not None and not self.active.sharded:
            logger.error("wenet_hooks: save '%s' was not committed (%s: %s); the newest committed save before it is "
                         "kept", failed.tag, failed.what, failed.failure.message)
        else:
            logger.error("wenet_hooks: the single file of save '%s' was not written (%s: %s); its sharded folder "
                         "is kept: convert it with wenet-hooks-convert", failed.tag, failed.what,
                         failed.failure.message)


_session = _Session()


def note_installed(places: list[str]) -> None:
    """Called by :mod:`wenet_hooks.wenet.patch`: where the wrappers were bound (logged once configured)."""
    _session.installed_into.extend(places)


def configure(configs: Mapping[str, Any]) -> Optional[ConsolidateConfig]:
    """Compose and validate ``configs['wenet_hooks']``; the active config, or None.

    Raises:
        ConfigError: listing every problem of the section.
    """
    if not _session.configured and _session.installed_into:
        # WeNet configures logging only after importing train_utils, so this is said now.
        logger.info("wenet_hooks: installed into WeNet (%s)", ", ".join(_session.installed_into))
    section = configs.get(SECTION)
    config = compose_section(section).consolidate
    engine = configs.get("train_engine")
    _session.activate(config if config.enabled and engine == DEEPSPEED else None)
    if _session.active is not None:
        log_rank0(logger, logging.INFO,
                  "wenet_hooks: writing <model_dir>/<tag>.pt at every %s save (dtype %s, verify %s, "
                  "keep_sharded %s, on_error %s); %s", "/".join(t.value for t in config.tags),
                  config.dtype.value, config.verify, config.keep_sharded, config.on_error.value,
                  describe_environment())
        for problem in environment_problems():
            log_rank0(logger, logging.WARNING, "wenet_hooks: %s", problem)
    elif section is not None:
        reason = "consolidate.enabled is false" if not config.enabled else f"train_engine is {engine}"
        log_rank0(logger, logging.INFO, "wenet_hooks: section present but inactive (%s): WeNet saves as usual",
                  reason)
    return _session.active


def wrap_check_modify_and_save_config(original: Callable) -> Callable:
    @functools.wraps(original)
    def check_modify_and_save_config(args, configs, *rest, **kwargs):
        configs = original(args, configs, *rest, **kwargs)
        config = configure(configs)
        if config is not None and config.resume is Resume.auto:
            _resume_automatically(args)
        # WeNet resumes with --checkpoint X.pt; the init save restores the rest from X.optim.
        _session.checkpoint = getattr(args, "checkpoint", None)
        return configs

    return check_modify_and_save_config


def _resume_automatically(args: Any) -> None:
    """Collective: ``resume: auto``: WeNet's ``--checkpoint`` becomes the newest committed save in model_dir.

    Called where WeNet has set up torch.distributed and not yet built the
    model, which it then loads from ``args.checkpoint``, with the epoch and
    step of the yaml beside it, as a ``--checkpoint`` given by hand.

    Raises:
        ResumeChoiceError: the ranks found different saves (model_dir is not one shared folder).
    """
    model_dir = Path(args.model_dir)
    newest = newest_committed(model_dir)
    choices = all_reports(str(newest) if newest is not None else None)
    if len(set(choices)) > 1:
        raise ResumeChoiceError(model_dir, choices)
    given = getattr(args, "checkpoint", None)
    if newest is None:
        log_rank0(logger, logging.INFO, "wenet_hooks: resume: auto: no committed save in %s (init aside): starting "
                  "as the command says (%s)", model_dir, f"--checkpoint {given}" if given else "from scratch")
        return
    args.checkpoint = str(newest)
    log_rank0(logger, logging.INFO, "wenet_hooks: resume: auto: continuing from %s, the newest committed save in %s "
              "(its %s records the files beside it; %s)", newest, model_dir, record_path(newest).name,
              f"instead of --checkpoint {given}" if given else "the command gave no --checkpoint")


def wrap_save_model(original: Callable) -> Callable:
    @functools.wraps(original)
    def save_model(model, info_dict):
        if not _session.configured:  # a trainer that never called the config check
            configure(info_dict)
        config = _session.active
        if config is not None and info_dict["tag"] == INIT_TAG:
            _resume(model)
            if info_dict.get("save_states") != MODEL_ONLY:
                # The background gathers' own gloo group, made now, before the first step: a bad network
                # setting (GLOO_SOCKET_IFNAME) stops the run here rather than at the first save.
                background_group()
        if config is None or not config.converts(info_dict["tag"]):
            if config is not None and _is_last_save(info_dict):
                # WeNet destroys every process group after this save, the background gathers' group with it.
                _settle_previous_write(config)
            return original(model, info_dict)
        return _save(original, model, info_dict, config)

    return save_model


def _resume(engine: Any) -> None:
    """Collective: WeNet reloaded only the weights of ``--checkpoint X.pt``; restore the rest from X.optim.

    WeNet saves ``init`` right after ``deepspeed.initialize``, before any step:
    the moment DeepSpeed's masters and optimizer state can still be set.
    """
    checkpoint = _session.checkpoint
    if not checkpoint or _session.resumed:
        return
    _session.resumed = True
    _warn_if_not_committed(checkpoint)
    optim = find_optimizer_file(checkpoint)
    # Every rank must take the same way (restore is collective): it is there for all, or it is not used.
    missing = None if optim is not None else Failure(get_rank(), f"no {optimizer_path(checkpoint)}")
    if first_failure(missing) is not None:
        log_rank0(logger, logging.WARNING, "wenet_hooks: %s has no %s beside it (on every rank): weights-only "
                  "resume, the optimizer starts afresh", checkpoint, optimizer_path(checkpoint).name)
        return
    assert optim is not None
    restored = restore(engine, checkpoint, optim)
    log_rank0(logger, logging.INFO, "wenet_hooks: resumed exactly from %s + %s: %s", checkpoint, optim.name,
              restored)


def _warn_if_not_committed(checkpoint: str) -> None:
    """With ``sharded: false`` the files are the only copy: a ``--checkpoint`` whose save never committed
    (cut off mid-commit) is named, with the newest committed save beside it. A model from elsewhere (a
    pretrained one to fine-tune: no optimizer file beside it, no committed save in its folder) is not."""
    config = _session.active
    reason = committed(checkpoint)
    if config is None or config.sharded or reason is None:
        return
    newest = newest_committed(Path(checkpoint).parent)
    if newest is None and find_optimizer_file(checkpoint) is None:
        return
    log_rank0(logger, logging.WARNING, "wenet_hooks: --checkpoint %s is not a committed save: %s; the newest "
              "committed save in that folder is %s; HINT: pass --checkpoint %s, or set wenet_hooks.consolidate.resume:"
              " auto", checkpoint, reason, newest or "none", newest or "<a committed save>")


def _save(original: Callable, model: Any, info_dict: dict, config: ConsolidateConfig) -> None:
    # WeNet's executor rewrites its info_dict (tag, step, losses) as soon as save_model returns, while this
    # save's <tag>.yaml is written in the background: everything after the call reads this copy.
    info = copy.deepcopy(dict(info_dict))
    model_dir, tag = Path(info["model_dir"]), info["tag"]
    model_only = info.get("save_states") == MODEL_ONLY
    _settle_previous_write(config)
    if not model_only and config.sharded:
        original(model, info_dict)  # sharded checkpoint + <tag>.yaml, as WeNet does
    _consolidate(model, model_dir, tag, config, info, model_only)
    if is_rank0() and tag.startswith("epoch_"):
        _session.final_link.remember(model_dir, tag)


def _settle_previous_write(config: ConsolidateConfig) -> None:
    """Collective: the previous save's background write must have succeeded."""
    try:
        settle_background(_session.writer)
    except SaveError as e:
        if config.on_error is OnError.stop:
            raise
        log_rank0(logger, logging.WARNING, "wenet_hooks: on_error is warn: training goes on, %s. %s",
                  "the sharded folder is kept" if config.sharded else "the earlier saves are kept", e)


def _is_last_save(info_dict: dict) -> bool:
    """WeNet's save of its last epoch: train.py runs epochs up to ``max_epoch`` (100 if unset), or
    one epoch in steps mode (``save_interval`` set)."""
    end_epoch = 1 if "save_interval" in info_dict else int(info_dict.get("max_epoch", WENET_MAX_EPOCH))
    return info_dict["tag"] == f"epoch_{end_epoch - 1}"


def _consolidate(model: Any, model_dir: Path, tag: str, config: ConsolidateConfig,
                 info_dict: dict, model_only: bool) -> None:
    """Collective: gather, then write ``<tag>.pt``.

    With model+optimizer the sharded folder already holds the save, so the
    gathers (from host copies taken now) and rank 0's writing go on in the
    background (training goes on; the next save, or the end of the process,
    waits for them) and retention runs once the files verified. With
    model_only the file is the only copy: it is written before returning.
    With ``sharded: false`` the files are the save, written in the background
    (model_only too), and ``<tag>.yaml`` follows once they are published.
    """
    def written() -> None:  # the sharded folder may go once the save it holds is committed
        _session.retention.after_verified(model_dir, tag, config.keep_last())

    # After its last save WeNet destroys the process group, and with it the group the background
    # gathers would use: that save gathers before training ends.
    last = _is_last_save(info_dict)
    in_background = not model_only or not config.sharded  # model_only's file is the only copy
    if last and in_background:
        log_rank0(logger, logging.INFO, "wenet_hooks: %s is WeNet's last save: it is gathered before training "
                  "ends", tag)
    options = config.save_options(optimizer=not model_only, background_gather=not last)
    try:
        save_consolidated(model, model_dir, tag, options,
                          writer=_session.writer if in_background else None,
                          on_written=written if in_background and config.sharded else None, record=info_dict)
        return
    except SaveError as e:
        if config.on_error is OnError.stop:
            raise
        log_rank0(logger, logging.WARNING, "wenet_hooks: on_error is warn: training goes on. %s", e)
    if model_only or not config.sharded:
        # Nothing else holds this save: keep DeepSpeed's sharded checkpoint
        # so it is not lost (wenet-hooks-convert turns it into a .pt).
        model.save_checkpoint(save_dir=str(model_dir), tag=tag, client_state=info_dict)
        if is_rank0():
            write_info_yaml(model_dir, tag, info_dict)
        log_rank0(logger, logging.WARNING, "wenet_hooks: kept DeepSpeed's sharded %s instead; convert it "
                  "later with `wenet-hooks-convert model_dir=%s tag=%s`", model_dir / tag, model_dir, tag)
