"""The lean read (facts/files.py) run for real with bash and dash against a temp dir: the same path
states as the per-path loop it replaced, in a constant number of processes per host.

`OLD_*` below are frozen copies of the loops the deploy ran before (git history: facts/files.py),
kept here only as the reference the new read must agree with.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from nemotron_deploy.deploy.facts.files import ManagedPaths, NodeState, PathChains, PathState, ancestors
from nemotron_deploy.deploy.facts.snapshot import HostSnapshot

SHELLS = [s for s in ("bash", "dash") if shutil.which(s)]


def old_managed_snippet(paths: tuple[str, ...], unhashed: tuple[str, ...] = ()) -> str:
    quoted = " ".join(shlex.quote(p) for p in paths)
    loop = (
        f"for p in {quoted}; do "
        'if [ -L "$p" ]; then printf \'L - - - %s %s\\n\' "$(readlink "$p")" "$p"; '
        "elif [ -f \"$p\" ]; then printf 'F %s %s %s ' $(stat -c '%a %U %G' \"$p\"); "
        "sha256sum \"$p\" | cut -d' ' -f1 | tr '\\n' ' '; printf '%s\\n' \"$p\"; "
        'elif [ -d "$p" ]; then printf \'D %s %s %s - %s\\n\' $(stat -c \'%a %U %G\' "$p") "$p"; '
        'elif [ -e "$p" ]; then printf \'O - - - - %s\\n\' "$p"; fi; done'
    )
    if not unhashed:
        return loop
    quoted = " ".join(shlex.quote(p) for p in unhashed)
    return loop + (
        f"\nfor p in {quoted}; do "
        'if [ -f "$p" ] && [ ! -L "$p" ]; then printf \'F %s %s %s - %s\\n\' $(stat -c \'%a %U %G\' "$p") "$p"; '
        'elif [ -e "$p" ]; then printf \'O - - - - %s\\n\' "$p"; fi; done'
    )


def old_managed_process(output: list[str]) -> dict[str, PathState]:
    kinds = {"F": "file", "D": "directory", "L": "link", "O": "other"}
    states = {}
    for line in output:
        fields = line.split(" ", 5)
        if len(fields) != 6 or fields[0] not in kinds:
            continue
        kind, mode, user, group, digest, path = fields
        states[path] = PathState(path, kinds[kind], mode, user, group, None if digest == "-" else digest)
    return states


def old_chains_snippet(paths: tuple[str, ...]) -> str:
    every = dict.fromkeys(p for path in paths for p in (path, *ancestors(path)))
    quoted = " ".join(shlex.quote(p) for p in every)
    return (
        'echo "@user $(id -un)"; '
        f'for p in {quoted}; do if [ -e "$p" ] || [ -L "$p" ]; then '
        "stat -c '%F|%f|%u|%U|%n' -- \"$p\"; fi; done"
    )


def old_chains_process(output: list[str]) -> dict:
    kinds = {"directory": "directory", "symbolic link": "link", "regular file": "file"}
    user, states = None, {}
    for line in output:
        if line.startswith("@user "):
            user = line[len("@user ") :].strip()
            continue
        fields = line.split("|", 4)
        if len(fields) != 5:
            continue
        kind, raw_mode, uid, name, path = fields
        states[path] = NodeState(path, kinds.get(kind, "other"), int(raw_mode, 16) & 0o7777, int(uid), name)
    return {"user": user, "paths": states}


def run(shell: str, snippet: str, *, wrap: bool = True) -> list[str]:
    """The snippet as pyinfra runs it on a host (the fact's command), its stdout as pyinfra's lines."""
    command = f"{{ {snippet}\n}} 2>&1; true" if wrap else snippet
    done = subprocess.run([shell, "-c", command], capture_output=True, check=True)
    return [line.decode() for line in done.stdout.split(b"\n")][:-1]


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, object]:
    """Every kind of path the deploy may meet, as (hashed paths, unhashed paths)."""
    (tmp_path / "file.py").write_text("print('hi')\n")
    (tmp_path / "file.py").chmod(0o755)
    (tmp_path / "setuid").write_text("s")
    (tmp_path / "setuid").chmod(0o4750)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir").chmod(0o1777)
    (tmp_path / "link").symlink_to("file.py")
    (tmp_path / "dangling").symlink_to("nowhere")
    (tmp_path / "with space").write_text("x")
    (tmp_path / "it's $HOME `x` | *").write_text("odd")
    (tmp_path / "empty").write_text("")
    os.mkfifo(tmp_path / "fifo")  # never opened: sha256sum on a fifo would wait for a writer
    (tmp_path / "image.sqsh").write_bytes(b"image")
    (tmp_path / "image.sqsh").chmod(0o640)
    (tmp_path / "image-link.sqsh").symlink_to("image.sqsh")
    (tmp_path / "image-dangling.sqsh").symlink_to("gone.sqsh")
    (tmp_path / "image-dir").mkdir()
    names = [
        "file.py",
        "setuid",
        "dir",
        "link",
        "dangling",
        "with space",
        "it's $HOME `x` | *",
        "empty",
        "fifo",
    ]
    hashed = tuple(str(tmp_path / n) for n in [*names, "missing"])
    unhashed = tuple(
        str(tmp_path / n)
        for n in ("image.sqsh", "image-link.sqsh", "image-dangling.sqsh", "image-dir", "absent.sqsh")
    )
    return {"root": tmp_path, "hashed": hashed, "unhashed": unhashed}


@pytest.mark.parametrize("shell", SHELLS)
def test_lean_read_gives_what_the_per_path_loop_gave(tree, shell):
    hashed, unhashed = tree["hashed"], tree["unhashed"]
    new = ManagedPaths().process(run(shell, ManagedPaths().snippet(hashed, unhashed)))
    old = old_managed_process(run(shell, old_managed_snippet(hashed, unhashed)))
    assert new == old
    root = tree["root"]
    # And what that is, spelled out (so agreeing with a broken reference would not pass):
    assert new[f"{root}/file.py"] == PathState(
        f"{root}/file.py",
        "file",
        "755",
        Path(root).owner(),
        Path(root).group(),
        hashlib.sha256(b"print('hi')\n").hexdigest(),
    )
    assert new[f"{root}/setuid"].mode == "4750" and new[f"{root}/dir"].mode == "1777"
    assert new[f"{root}/dir"].kind == "directory" and new[f"{root}/dir"].sha256 is None
    assert (new[f"{root}/link"].kind, new[f"{root}/link"].sha256) == ("link", "file.py")  # not followed
    assert (new[f"{root}/dangling"].kind, new[f"{root}/dangling"].sha256) == ("link", "nowhere")
    assert new[f"{root}/with space"].sha256 == hashlib.sha256(b"x").hexdigest()
    assert new[f"{root}/it's $HOME `x` | *"].sha256 == hashlib.sha256(b"odd").hexdigest()
    assert new[f"{root}/empty"].sha256 == hashlib.sha256(b"").hexdigest()
    assert new[f"{root}/fifo"].kind == "other"
    assert f"{root}/missing" not in new
    image = new[f"{root}/image.sqsh"]
    assert (image.kind, image.mode, image.sha256) == ("file", "640", None)  # stat-ed, never read
    assert new[f"{root}/image-link.sqsh"].kind == "other" and new[f"{root}/image-dir"].kind == "other"
    assert f"{root}/image-dangling.sqsh" not in new and f"{root}/absent.sqsh" not in new


@pytest.mark.parametrize("shell", SHELLS)
def test_lean_read_keeps_names_with_newlines_and_backslashes_whole(tmp_path, shell):
    """The loop it replaced split such a name over two lines and lost the path, and took the
    backslash sha256sum puts before an escaped name's line for part of the digest."""
    odd = tmp_path / "new\nline \\n and \\\\ too"
    odd.write_text("n")
    target = tmp_path / "to\nthere"
    link = tmp_path / "link\nname"
    link.symlink_to(target)
    states = ManagedPaths().process(run(shell, ManagedPaths().snippet((str(odd), str(link)))))
    assert states[str(odd)].sha256 == hashlib.sha256(b"n").hexdigest()
    assert states[str(link)].kind == "link" and states[str(link)].sha256 == str(target)
    assert set(states) == {str(odd), str(link)}


@pytest.mark.parametrize("shell", SHELLS)
def test_directory_chains_read_as_before(tree, shell):
    root = tree["root"]
    paths = (f"{root}/dir", f"{root}/link", f"{root}/setuid", f"{root}/missing/below")
    new = PathChains().process(run(shell, PathChains().snippet(paths)))
    old = old_chains_process(run(shell, old_chains_snippet(paths)))
    assert new["user"] == old["user"]
    assert new["paths"] == {**old["paths"], "/": new["paths"]["/"]}  # "/" is in every chain anyway
    assert new["paths"][f"{root}/link"].kind == "link"
    assert new["paths"][f"{root}/dir"].mode == 0o1777 and new["paths"][f"{root}/setuid"].mode == 0o4750
    assert f"{root}/missing" not in new["paths"]


def test_both_reads_in_one_snapshot_keep_their_sections_apart(tree):
    hashed, unhashed = tree["hashed"], tree["unhashed"]
    probes = (
        ("paths", ManagedPaths, (hashed, unhashed)),
        ("chains", PathChains, ((f"{tree['root']}/dir",),)),
    )
    snap = HostSnapshot().process_sections(probes, run("sh", HostSnapshot().command(probes), wrap=False))
    assert snap["paths"] == ManagedPaths().process(run("sh", ManagedPaths().snippet(hashed, unhashed)))
    assert snap["chains"]["paths"][f"{tree['root']}/dir"].kind == "directory"


def forks(snippet: str) -> int:
    """Processes the snippet starts, counted in a PID namespace of its own (its shell is PID 1)."""
    probe = f"{{ {snippet}\n}} >/dev/null 2>&1; cat /proc/sys/kernel/ns_last_pid"
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "dash", "-c", probe],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"no PID namespace for this user here ({done.stderr.strip()}): the count needs one")
    return int(done.stdout.split()[-1]) - 2  # not the shell (1) nor the cat that reads the count


def test_lean_read_runs_a_constant_number_of_processes(tmp_path):
    if not shutil.which("unshare") or not shutil.which("dash"):
        pytest.skip("needs unshare (util-linux) and dash")
    files = []
    for i in range(40):
        (tmp_path / f"f{i}").write_text(str(i))
        files.append(str(tmp_path / f"f{i}"))
    (tmp_path / "d").mkdir()
    few, many = (*files[:2], str(tmp_path / "d")), (*files, str(tmp_path / "d"))
    new = {n: forks(ManagedPaths().snippet(p, (files[0],))) for n, p in (("few", few), ("many", many))}
    old = {n: forks(old_managed_snippet(p, (files[0],))) for n, p in (("few", few), ("many", many))}
    assert new["few"] == new["many"] == 2, new  # sha256sum and find
    assert old["many"] >= 4 * len(files), old  # the loop it replaced: stat, sha256sum, cut, tr per file
    chains = {n: forks(PathChains().snippet(tuple(p))) for n, p in (("few", few[:1]), ("many", many))}
    assert chains["few"] == chains["many"] == 2, chains  # id -un and stat
