"""``wenet-hooks-convert``: the offline command, a Hydra application.

    wenet-hooks-convert model_dir=exp/whisper tag=epoch_7
    wenet-hooks-convert model_dir=exp/whisper dry_run=true
    wenet-hooks-convert model_dir=exp/whisper dtype=bf16 keep_sharded=false

Exit status: 0 when everything asked for was converted (or, with dry_run,
could be); 2 otherwise. Never "skipping" with status 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from wenet_hooks.config import ConvertConfig, config_search_path, register_configs
from wenet_hooks.errors import WenetHooksError, describe
from wenet_hooks.offline.convert import (
    Outcome,
    Source,
    convert_tag,
    find_sources,
    finish_interrupted_repairs,
    has_valid_single_file,
    resolve_tag,
)
from wenet_hooks.offline.report import Progress, print_plan, print_summary

logger = logging.getLogger("wenet_hooks.convert")

EXIT_FAILED = 2


def plan(options: ConvertConfig) -> list[Source]:
    """The sources to convert; raises if what was asked for does not exist."""
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
    todo = [s for tag, s in sorted(sources.items()) if options.overwrite or not has_valid_single_file(model_dir, tag)]
    return todo


def expected_manifest(options: ConvertConfig):
    if options.config is None:
        return None
    from wenet_hooks.offline.wenet_model import manifest_from_wenet_config

    return manifest_from_wenet_config(Path(options.config))


def run(options: ConvertConfig) -> int:
    """Convert what ``options`` asks for; the process exit status."""
    try:
        sources = plan(options)
        expected = expected_manifest(options)
    except WenetHooksError as e:
        logger.error("%s", e)
        return EXIT_FAILED
    if options.dry_run:
        print_plan(sources, Path(options.model_dir))
        return 0
    outcomes = [_convert_one(source, options, expected) for source in sources]
    print_summary(outcomes)
    failed = [o for o in outcomes if o.error]
    return EXIT_FAILED if failed else 0


def _convert_one(source: Source, options: ConvertConfig, expected) -> Outcome:
    with Progress(source.tag) as progress:
        try:
            return convert_tag(source, Path(options.model_dir), dtype=options.dtype.value,
                               overwrite=options.overwrite, keep_sharded=options.keep_sharded,
                               expected=expected, progress=progress.update)
        except (WenetHooksError, OSError) as e:  # OSError: the file system refused (permissions, space)
            logger.error("%s: %s", source.tag, e)
            return Outcome(source.tag, source.kind, error=describe(e).splitlines()[0])


@hydra.main(version_base="1.3", config_path=config_search_path(), config_name="convert")
def _hydra_main(cfg: DictConfig) -> Optional[int]:
    options: ConvertConfig = OmegaConf.to_object(cfg)
    status = run(options)
    if status:
        sys.exit(status)
    return None


def main() -> None:
    """Console entry point of ``wenet-hooks-convert``."""
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
