"""Temporary folders that name their owner: a later start removes those a killed process left."""

from __future__ import annotations

import os
import subprocess
import sys

from netem.tempdirs import OWNER, owned_tempdir, remove_stale


def test_a_folder_whose_owner_died_is_removed_and_others_are_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = owned_tempdir("specwan-test-")
    assert (mine / OWNER).read_text().split()[0] == str(os.getpid())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "specwan-test-stale"
    stale.mkdir()
    (stale / OWNER).write_text(f"{int(dead.stdout)} 1.000")
    reused = tmp_path / "specwan-test-reused"  # a live pid, but not the process that made it
    reused.mkdir()
    (reused / OWNER).write_text(f"{os.getppid()} 1.000")
    foreign = tmp_path / "specwan-test-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    removed = remove_stale("specwan-test-")
    assert sorted(p.name for p in removed) == ["specwan-test-reused", "specwan-test-stale"]
    assert mine.exists() and foreign.exists() and not stale.exists() and not reused.exists()


def test_a_stale_folder_written_into_while_it_is_removed_is_removed_all_the_same(tmp_path, monkeypatch):
    """A dead owner's emulator may write its counters into the folder as the folder is being
    emptied. The late file must not leave a folder without its owner file behind (nothing
    would ever recognise it as stale again)."""
    import shutil
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "specwan-test-late"
    stale.mkdir()
    (stale / OWNER).write_text(f"{int(dead.stdout)} 1.000")
    real_rmtree, calls = shutil.rmtree, []

    def rmtree_with_a_late_writer(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        calls.append(path)
        if len(calls) == 1:  # the emulator's exit lands just after the folder was emptied
            os.makedirs(path, exist_ok=True)
            (stale / "tunwire0.stats.json").write_text("{}")

    monkeypatch.setattr(shutil, "rmtree", rmtree_with_a_late_writer)
    assert remove_stale("specwan-test-") == [stale]
    assert not stale.exists() and len(calls) == 2
