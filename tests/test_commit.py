"""A save commits as a whole: killed (SIGKILL) at each step of the commit, the newest committed save is
whole and nothing uncommitted is taken for one.

Each case runs a real process that writes a save through the package's own commit
(``wenet_hooks.file.commit.commit``), with every rename and folder fsync counted, and
kills itself just before the N-th of them (the seals' own fsyncs come first:
``kill_before_seal``). The folder already holds a committed save of the same tag
(a rerun saving it again: the riskiest case) and an older tag.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from wenet_hooks.file.commit import LATEST, RECORD_KEY, committed, fingerprint, newest_committed, read_record

WRITER = textwrap.dedent('''
    import os, signal, sys, time
    from pathlib import Path
    import torch
    import wenet_hooks.file.publish as publish
    from wenet_hooks.file.commit import commit
    from wenet_hooks.file.writer import entries_for

    folder, tag, value, kill_at = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    steps = []

    def counted(name, real):
        def step(*args):
            steps.append(f"{name} {Path(args[-1]).name}")
            if kill_at == str(len(steps)):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return step

    publish.replace_file = counted("rename", publish.replace_file)
    publish.fsync_dir = counted("fsync", publish.fsync_dir)
    real_seal = publish.PendingFile.seal

    def seal(self):
        if kill_at == "seal":
            os.kill(os.getpid(), signal.SIGKILL)
        real_seal(self)

    publish.PendingFile.seal = seal

    def pending(path, tensors):
        entries, values = entries_for(tensors)
        file = publish.PendingFile(path, entries)
        for e, v in zip([e for e in entries if not e.alias_of], values):
            file.write(e.key, v)
        return file

    weights = pending(folder / f"{tag}.pt", {"w": torch.full((64,), value), "b": torch.arange(4.0) + value})
    optim = pending(folder / f"{tag}.optim", {"exp_avg/w": torch.full((64,), -value)})
    commit(weights, optim, {"tag": tag, "step": int(value)})
    print(" | ".join(steps))
''')



def steps(folder: Path) -> list[str]:
    """The steps of one commit of step_2, in order (what the writer prints when nothing kills it)."""
    return ["rename step_2.pt", "rename step_2.optim", "rename step_2.yaml", f"fsync {folder.name}",
            "rename latest_save", f"fsync {folder.name}"]


def save(folder: Path, tag: str, value: float, kill_at: str = "never") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(folder), tag, str(value), kill_at],
                          capture_output=True, text=True, timeout=120)


def commit_here(folder: Path, tag: str, value: float, step: int) -> None:
    """A committed save of ``tag`` written in this process, through the package's commit."""
    from wenet_hooks.file.commit import commit
    from wenet_hooks.file.writer import entries_for
    from wenet_hooks.file.publish import PendingFile

    files = []
    for path, tensors in ((folder / f"{tag}.pt", {"w": torch.full((64,), value)}),
                          (folder / f"{tag}.optim", {"exp_avg/w": torch.full((64,), -value)})):
        entries, values = entries_for(tensors)
        files.append(PendingFile(path, entries))
        files[-1].write(entries[0].key, values[0])
    commit(files[0], files[1], {"tag": tag, "step": step, "epoch": 0})


def weights_value(path: Path) -> float:
    return float(torch.load(str(path), weights_only=True)["w"][0])


def test_a_whole_commit_renames_in_order_and_records_the_fingerprints(tmp_path):
    done = save(tmp_path, "step_2", 2.0)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().split(" | ") == steps(tmp_path)
    info = yaml.safe_load((tmp_path / "step_2.yaml").read_text())
    assert info["tag"] == "step_2" and info["step"] == 2
    assert info[RECORD_KEY] == {"weights": fingerprint(tmp_path / "step_2.pt"),
                                "optimizer": fingerprint(tmp_path / "step_2.optim")}
    assert read_record(tmp_path / "step_2.pt").weights == fingerprint(tmp_path / "step_2.pt")
    assert committed(tmp_path / "step_2.pt") is None
    assert (tmp_path / LATEST).read_text() == "step_2\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kill_at", ["seal"] + [str(n) for n in range(1, 7)])
def test_killed_at_each_step_of_the_commit_the_newest_committed_save_is_whole(tmp_path, kill_at):
    """step_1 (older) and step_2 (value 2) are committed; step_2 is saved again with value 3 and killed."""
    for tag, value in (("step_1", 1.0), ("step_2", 2.0)):
        commit_here(tmp_path, tag, value, int(value))
    os.utime(tmp_path / "step_1.yaml", ns=(1, 1))  # older, whatever the clock's resolution
    killed = save(tmp_path, "step_2", 3.0, kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    newest = newest_committed(tmp_path)
    reason = committed(tmp_path / "step_2.pt")
    renamed = 0 if kill_at == "seal" else int(kill_at) - 1  # steps done before the kill
    if renamed < 3:  # the record was not renamed: step_2 is the old save (whole) or a cut-off mix (refused)
        if renamed == 0:
            assert reason is None and weights_value(tmp_path / "step_2.pt") == 2.0, on_disk
        else:
            assert reason is not None and "a later save of the same tag was cut off" in reason, (reason, on_disk)
            assert newest == tmp_path / "step_1.pt", on_disk
            return
    else:  # the record was renamed: the new save is whole
        assert reason is None and weights_value(tmp_path / "step_2.pt") == 3.0, on_disk
    assert newest == tmp_path / "step_2.pt"
    assert weights_value(newest) in (2.0, 3.0)
    assert float(torch.load(str(tmp_path / "step_2.optim"), weights_only=True)["exp_avg/w"][0]) \
        == -weights_value(newest)  # the optimizer file beside it is its own
    # A rerun's save of the same tag removes the leftovers and commits.
    commit_here(tmp_path, "step_2", 4.0, 4)
    assert committed(tmp_path / "step_2.pt") is None and weights_value(newest_committed(tmp_path)) == 4.0
    assert not list(tmp_path.glob("*.tmp"))


def test_a_yaml_without_a_record_or_files_missing_are_not_committed(tmp_path):
    commit_here(tmp_path, "step_5", 5.0, 5)
    (tmp_path / "step_5.optim").unlink()
    assert committed(tmp_path / "step_5.pt") == "step_5.optim is missing or unreadable"
    (tmp_path / "step_6.pt").write_bytes((tmp_path / "step_5.pt").read_bytes())
    (tmp_path / "step_6.yaml").write_text(yaml.dump({"tag": "step_6", "step": 6}))  # WeNet's own, no record
    assert committed(tmp_path / "step_6.pt") == (f"step_6.yaml is missing or holds no {RECORD_KEY} record (the "
                                                  "save never committed)")
    assert newest_committed(tmp_path) is None


def test_resume_auto_takes_the_newest_committed_save_and_says_why(tmp_path, caplog):
    """``resume: auto`` sets WeNet's --checkpoint to the newest committed save (init aside: a rerun
    re-saves it from what it resumed, without WeNet's step), whatever the command gave."""
    from types import SimpleNamespace

    from wenet_hooks.wenet import hook

    args = SimpleNamespace(model_dir=str(tmp_path), checkpoint="pretrained.pt")
    with caplog.at_level("INFO", logger="wenet_hooks.wenet.hook"):
        hook._resume_automatically(args)
    assert args.checkpoint == "pretrained.pt"
    assert f"resume: auto: no committed save in {tmp_path} (init aside): starting as the command says " \
           "(--checkpoint pretrained.pt)" in caplog.text
    for tag, value, step in (("step_3", 3.0, 3), ("step_5", 5.0, 5), ("init", 9.0, 0)):
        commit_here(tmp_path, tag, value, step)
    os.utime(tmp_path / "step_3.yaml", ns=(1, 1))
    # A newer save cut off between its renames: never taken.
    (tmp_path / "step_7.pt").write_bytes((tmp_path / "step_5.pt").read_bytes())
    (tmp_path / "step_7.yaml").write_text(yaml.dump({"tag": "step_7", "step": 7}))
    caplog.clear()
    with caplog.at_level("INFO", logger="wenet_hooks.wenet.hook"):
        hook._resume_automatically(args)
    assert args.checkpoint == str(tmp_path / "step_5.pt")
    assert f"resume: auto: continuing from {tmp_path / 'step_5.pt'}, the newest committed save in {tmp_path} " \
           "(its step_5.yaml records the files beside it; instead of --checkpoint pretrained.pt)" in caplog.text


def files_only_warning(checkpoint: Path, caplog, monkeypatch) -> str:
    """What the hook warns about ``checkpoint`` at a ``sharded: false`` resume."""
    from wenet_hooks.wenet import hook
    from wenet_hooks.wenet.config import ConsolidateConfig

    monkeypatch.setattr(hook._session, "active", ConsolidateConfig(enabled=True, sharded=False))
    caplog.clear()
    with caplog.at_level("WARNING", logger="wenet_hooks.wenet.hook"):
        hook._warn_if_not_committed(str(checkpoint))
    return caplog.text


def test_files_only_a_checkpoint_that_never_committed_is_named_with_the_newest_committed(tmp_path, caplog,
                                                                                          monkeypatch):
    commit_here(tmp_path, "step_5", 5.0, 5)
    (tmp_path / "step_7.pt").write_bytes((tmp_path / "step_5.pt").read_bytes())  # its yaml never renamed
    assert (f"--checkpoint {tmp_path / 'step_7.pt'} is not a committed save: step_7.yaml is missing or holds no "
            f"{RECORD_KEY} record (the save never committed); the newest committed save in that folder is "
            f"{tmp_path / 'step_5.pt'}; HINT: pass --checkpoint {tmp_path / 'step_5.pt'}, or set "
            "wenet_hooks.consolidate.resume: auto") in files_only_warning(tmp_path / "step_7.pt", caplog, monkeypatch)
    # A pretrained model from elsewhere (no optimizer file, no committed save beside it) is not named.
    elsewhere = tmp_path / "pretrained"
    elsewhere.mkdir()
    (elsewhere / "whisper.pt").write_bytes((tmp_path / "step_5.pt").read_bytes())
    assert files_only_warning(elsewhere / "whisper.pt", caplog, monkeypatch) == ""


def test_a_save_commits_its_files_and_record_or_nothing(tmp_path, monkeypatch):
    """One process (a world of one): the save's steps plan -> prepare -> gather -> vote -> commit, then a commit whose
    rename fails: SaveError, nothing under a final name, no temporary file left."""
    import errno

    import wenet_hooks.file.publish as publish
    from support.tiny_model import build_model
    from wenet_hooks import SaveOptions, save_consolidated
    from wenet_hooks.errors import SaveError

    model = build_model()
    info = {"tag": "step_1", "step": 1, "loss_dict": {"loss": 2.5}}
    save_consolidated(model, tmp_path, "step_1", SaveOptions(), record=info)
    info["tag"] = "TRAIN"  # the caller's dict moves on; the save took a copy at the call
    assert committed(tmp_path / "step_1.pt") is None and (tmp_path / LATEST).read_text() == "step_1\n"
    written = yaml.safe_load((tmp_path / "step_1.yaml").read_text())
    assert written["tag"] == "step_1" and written[RECORD_KEY]["optimizer"] is None

    def broken_rename(tmp, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(publish, "replace_file", broken_rename)
    with pytest.raises(SaveError, match=r"^save 'step_2' failed on rank 0 while writing .*step_2\.pt: could not "
                                         r"write .*step_2\.pt: Input/output error \(OSError\)$"):
        save_consolidated(model, tmp_path, "step_2", SaveOptions(), record={"tag": "step_2"})
    assert sorted(p.name for p in tmp_path.iterdir() if "step_2" in p.name) == []
