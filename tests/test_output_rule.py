"""The output rule itself (``outputs.write_output``, ``claim_output``, ``recover``): a rewrite of a folder of ours
replaces exactly the files its marker lists, leaves a user's files alone, refuses a user file in the way, and is
atomic for its own files, including when the writing process is killed outright at a random moment."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import launcher_env

from finderpartner.errors import OutputError
from finderpartner.outputs import MARKER, STAGING, claim_output, read_marker, recover, write_output

pytestmark = pytest.mark.slow  # trains a model or starts processes (the fast subset: pytest -m 'not slow')


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256 of its bytes), the marker and staging left out."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and STAGING not in p.parts
    }


def version(n: int, files: int = 3) -> dict[str, str]:
    """The files of output version ``n``: some of them in a subfolder, one of them only in odd versions."""
    found = {f"part_{i}.txt": f"version {n}, part {i}\n" for i in range(files)}
    found["sub/deep/data.bin"] = f"data of version {n}\n" * 50
    if n % 2:
        found["only_odd.txt"] = f"odd {n}\n"
    return found


def write_version(target: Path, n: int, files: int = 3) -> None:
    def write(tmp: Path) -> None:
        for name, text in version(n, files).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)

    write_output(write, target, "test", {"version": n})


def expected(n: int, files: int = 3) -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in version(n, files).items()}


def add_user_files(target: Path) -> dict[str, str]:
    (target / "notes.txt").write_text("mine")
    (target / "mine").mkdir()
    (target / "mine" / "a.txt").write_text("also mine")
    (target / "sub" / "deep" / "my_note.txt").write_text("inside a folder of ours")
    (target / ".old-drafts").mkdir()
    (target / ".old-drafts" / "ch1.txt").write_text("chapter one")
    return tree(target)


def test_a_rewrite_replaces_only_the_marked_files_and_keeps_the_users(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_version(out, 1)
    assert tree(out) == expected(1)
    assert sorted(read_marker(out)["files"]) == sorted(version(1))
    user = {k: v for k, v in add_user_files(out).items() if k not in version(1)}
    write_version(out, 2)  # version 2 has no only_odd.txt: that one file of ours goes
    assert tree(out) == {**expected(2), **user}
    assert not (out / "only_odd.txt").exists() and not (out / STAGING).exists()
    assert read_marker(out)["inputs"] == {"version": 2}


def test_folders_of_ours_go_only_when_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def write(files: dict[str, str]):
        def fill(tmp: Path) -> None:
            for name, text in files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(text)

        return fill

    write_output(write({"a/b/one.txt": "1", "c/two.txt": "2"}), out, "test", {})
    (out / "c" / "mine.txt").write_text("user")
    write_output(write({"three.txt": "3"}), out, "test", {})
    assert not (out / "a").exists()  # emptied: removed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [MARKER, "c", "c/mine.txt", "three.txt"]


def test_a_user_file_where_the_command_writes_refuses_the_whole_write(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_version(out, 2)  # even: no only_odd.txt
    (out / "only_odd.txt").write_text("the user's, same name")
    before = tree(out)
    with pytest.raises(OutputError, match=r"only_odd\.txt was not written by finderpartner.*Nothing was changed"):
        write_version(out, 3)
    assert tree(out) == before and read_marker(out)["inputs"] == {"version": 2}
    (out / "only_odd.txt").unlink()
    (out / "sub").rename(out / "sub_mine")
    (out / "sub").write_text("a file where a folder of ours goes")
    with pytest.raises(OutputError, match=r"sub is in the way .* a file it did not write"):
        write_version(out, 3)


def test_a_failing_writer_leaves_the_previous_version_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_version(out, 1)
    user = add_user_files(out)

    def half_then_fail(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "part_0.txt").write_text("new")
        raise KeyboardInterrupt  # Ctrl-C while writing

    with pytest.raises(KeyboardInterrupt):
        write_output(half_then_fail, out, "test", {"version": 9})
    assert tree(out) == user and not (out / STAGING).exists()
    assert read_marker(out)["inputs"] == {"version": 1}


def test_a_staging_folder_or_a_dot_tmp_sibling_that_is_not_ours_is_never_touched(tmp_path: Path) -> None:
    out = tmp_path / "idx11"
    sibling = tmp_path / ".tmp-idx11"  # what the old code staged into (and deleted) beside --out
    sibling.mkdir()
    (sibling / "thesis.txt").write_text("years of work")
    old_sibling = tmp_path / ".old-idx11"
    old_sibling.mkdir()
    (old_sibling / "draft.txt").write_text("a draft")
    write_version(out, 1)
    write_version(out, 2)
    assert (sibling / "thesis.txt").read_text() == "years of work" and (old_sibling / "draft.txt").exists()
    (out / STAGING).mkdir()
    (out / STAGING / "mine.txt").write_text("a user's folder that happens to have our name")
    with pytest.raises(OutputError, match="which finderpartner did not make"):
        write_version(out, 3)
    assert (out / STAGING / "mine.txt").read_text().startswith("a user's")
    assert read_marker(out)["inputs"] == {"version": 2}


def test_a_staging_folder_that_died_before_its_proof_is_cleaned_by_the_next_claim(tmp_path: Path) -> None:
    """Killed (or out of space) between making the staging folder and writing its proof: an empty folder, or one
    with the lock and an empty proof file. The next claim removes it (it used to block every later write)."""
    out = tmp_path / "out"
    write_version(out, 1)
    for leftover in ([], [".lock"], [".lock", "staging.json"]):
        (out / STAGING).mkdir()
        for name in leftover:
            (out / STAGING / name).write_text("")
        assert claim_output(out, "test", {"version": 1}) == "same"
        assert not (out / STAGING).exists()
    (out / STAGING).mkdir()
    (out / STAGING / ".lock").write_text("")
    write_version(out, 2)  # and a write goes ahead too
    assert tree(out) == expected(2)


def test_hidden_user_files_are_content_and_os_litter_is_not(tmp_path: Path) -> None:
    out = tmp_path / "idx12"
    (out / ".old-drafts").mkdir(parents=True)
    (out / ".old-drafts" / "ch1.txt").write_text("chapter one")
    (out / "desktop.ini").write_text("[.ShellClassInfo]")
    with pytest.raises(OutputError, match=r"holds 1 item\(s\) that finderpartner did not write \(\.old-drafts\)"):
        claim_output(out, "index", {"images": tmp_path / "photos"})
    (out / ".old-drafts" / "ch1.txt").unlink()
    (out / ".old-drafts").rmdir()
    assert (
        claim_output(out, "index", {"images": tmp_path / "photos"}) == "new"
    )  # only litter: empty, and the litter stays
    write_version(out, 1)
    assert (out / "desktop.ini").read_text() == "[.ShellClassInfo]"


def test_output_dot_and_a_trailing_slash_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    for n, name in enumerate([".", "./", f"../{here.name}/"], start=1):
        assert claim_output(Path(name), "test", {"version": n}, overwrite=True) in ("new", "replace")
        write_version(Path(name), n)
        assert tree(here) == expected(n)


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path: Path) -> None:
    """Two real processes: the first holds its staging folder's lock while it writes; the second is refused."""
    out = tmp_path / "out"
    write_version(out, 1)
    script = (
        "import sys, time; from pathlib import Path; from finderpartner.outputs import write_output\n"
        "def slow(tmp):\n"
        "    tmp.mkdir(); (tmp / 'part_0.txt').write_text('slow'); print('writing', flush=True); time.sleep(60)\n"
        "write_output(slow, Path(sys.argv[1]), 'test', {'version': 5})\n"
    )
    first = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], env=launcher_env(), stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(OutputError, match=f"in use by PID {first.pid}"):
            claim_output(out, "test", {"version": 1})
        with pytest.raises(OutputError, match=f"in use by PID {first.pid}"):
            write_version(out, 3)
    finally:
        first.kill()
        first.wait()
    assert claim_output(out, "test", {"version": 1}) == "same"  # its leftovers, cleaned once it is gone
    assert not (out / STAGING).exists() and tree(out) == expected(1)


_KILLED_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from finderpartner.outputs import read_marker, recover
from test_output_rule import write_version
out = Path(sys.argv[1])
recover(out)
n = read_marker(out)["inputs"]["version"]
print("ready", flush=True)
while True:  # rewrite version after version until killed
    n += 1
    write_version(out, n, files=200)
"""


def _kill_in_renames(out: Path, proc: subprocess.Popen, rng: random.Random, at_once: bool) -> bool:
    """Wait until the journal exists (the renames have begun), then kill: at once (inside the renames), or within
    150 ms (the renames take a few ms on a quiet machine, tens on a busy one; the cleanup more)."""
    deadline = time.monotonic() + 60
    while not (out / STAGING / "journal.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.0002)
    if not at_once:
        time.sleep(rng.uniform(0.0, 0.15))
    return True


def test_sigkill_at_random_moments_leaves_one_whole_version_and_the_users_files(tmp_path: Path) -> None:
    """A process rewriting its output in a loop is SIGKILLed at random moments: half of them anywhere (mostly in
    the staging write), half once its journal exists (at once: in the renames; or later: the commit, the cleanup). Afterwards, once
    the next claim has recovered the folder, it holds exactly one version's files, whole, plus every user file.
    The moments are printed (pytest -s shows them)."""
    out = tmp_path / "out"
    write_version(out, 1, files=200)
    user = {k: v for k, v in add_user_files(out).items() if k not in version(1, 200)}
    rng = random.Random(21)
    seen = []
    for i in range(16):
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(out), str(Path(__file__).parent)],
            env=launcher_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        before = read_marker(out)["inputs"]["version"]
        if i % 2:
            _kill_in_renames(out, proc, rng, at_once=i % 4 == 1)
        else:
            time.sleep(rng.uniform(0.0, 1.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = (
            "journal" if (out / STAGING / "journal.json").exists() else "staging" if (out / STAGING).exists() else "-"
        )
        recover(out)
        n = read_marker(out)["inputs"]["version"]
        seen.append(f"versions {before} -> {n}, killed with {left} left")
        assert tree(out) == {**expected(n, 200), **user}, seen[-1]
        assert not (out / STAGING).exists()
    print("\n" + "\n".join(seen))
    assert any("journal" in s for s in seen), seen  # kills did land between the first rename and the cleanup
