"""What a run of the offline command converts: every tag of a ``model_dir`` that has
a sharded ``<tag>/`` or a folder-shaped ``<tag>.pt/``, or the one tag asked for."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from wenet_hooks.convert.options import ConvertConfig
from wenet_hooks.errors import CheckpointReadError, VerificationError, WenetHooksError
from wenet_hooks.file.verify import load_state_dict_file
from wenet_hooks.readers.folder import is_folder_shaped
from wenet_hooks.readers.sharded import is_sharded_checkpoint

logger = logging.getLogger(__name__)

ASIDE_SUFFIX = ".being-replaced"  # <tag>.pt.being-replaced/: a folder-shaped .pt during its repair
LATEST = "latest"  # DeepSpeed's file naming the newest tag

SHARDED, FOLDER = "sharded", "folder"


@dataclass(frozen=True)
class Source:
    """Where one tag's weights are read from."""

    tag: str
    kind: str  # SHARDED or FOLDER
    path: Path


def plan(options: ConvertConfig) -> list[Source]:
    """The sources to convert.

    Raises:
        WenetHooksError: ``model_dir`` is not a folder, holds no checkpoint, or
            has none for the tag asked for; each says what to do.
    """
    model_dir = Path(options.model_dir)
    if not model_dir.is_dir():
        raise WenetHooksError(f"model_dir {model_dir} is not a folder; HINT: pass the experiment folder that "
                              "holds <tag>/ or <tag>.pt/, e.g. model_dir=exp/whisper")
    sources = find_sources(model_dir)
    if not sources:
        raise WenetHooksError(f"{model_dir} holds no DeepSpeed checkpoint (<tag>/ with *model_states.pt) and no "
                              "folder-shaped <tag>.pt/; HINT: is this the right model_dir?")
    if not options.dry_run:
        finish_interrupted_repairs(model_dir, sources)
    if options.tag is not None:
        tag = resolve_tag(model_dir, options.tag, sources)
        if tag not in sources:
            raise WenetHooksError(f"{model_dir} has no checkpoint for tag '{tag}' (neither {tag}/ nor a folder "
                                  f"{tag}.pt/); HINT: tags found: {', '.join(sorted(sources)) or 'none'}")
        return [sources[tag]]
    return [s for tag, s in sorted(sources.items()) if options.overwrite or not has_valid_single_file(model_dir, tag)]


def find_sources(model_dir: Path) -> dict[str, Source]:
    """Every tag in ``model_dir`` with a sharded folder or a folder-shaped ``.pt``."""
    sources: dict[str, Source] = {}
    for entry in sorted(model_dir.iterdir()):
        for suffix in (".pt" + ASIDE_SUFFIX, ".pt"):
            if entry.name.endswith(suffix) and is_folder_shaped(entry):
                tag = entry.name[: -len(suffix)]
                sources.setdefault(tag, Source(tag, FOLDER, entry))
                break
    for entry in sorted(model_dir.iterdir()):
        if is_sharded_checkpoint(entry):  # preferred: complete, frozen weights included
            sources[entry.name] = Source(entry.name, SHARDED, entry)
    return sources


def finish_interrupted_repairs(model_dir: Path, sources: dict[str, Source]) -> None:
    """Remove ``<tag>.pt.being-replaced/`` folders whose single file was already published.

    A file is published only after it verified, so such a folder is a leftover
    of a run stopped between the rename and the clean-up.
    """
    for tag, source in list(sources.items()):
        if source.path.name.endswith(ASIDE_SUFFIX) and has_valid_single_file(model_dir, tag):
            shutil.rmtree(source.path)
            logger.info("removed %s: %s.pt was already written and verified", source.path, tag)
            del sources[tag]


def resolve_tag(model_dir: Path, tag: str, sources: dict[str, Source]) -> str:
    """``latest`` means the tag named in ``model_dir/latest``."""
    if tag != LATEST:
        return tag
    latest = model_dir / LATEST
    if not latest.is_file():
        raise CheckpointReadError(latest, "does not exist, so tag=latest names nothing; HINT: pass tag=<name>")
    named = latest.read_text().strip()
    if named not in sources:
        raise CheckpointReadError(latest, f"names tag '{named}', which has no checkpoint in {model_dir}; "
                                  f"HINT: pass one of: {', '.join(sorted(sources)) or 'none found'}")
    return named


def has_valid_single_file(model_dir: Path, tag: str) -> bool:
    """Whether ``<model_dir>/<tag>.pt`` is one file that loads as a flat state dict."""
    path = model_dir / f"{tag}.pt"
    if not path.is_file():
        return False
    try:
        load_state_dict_file(path)
        return True
    except VerificationError:
        return False
