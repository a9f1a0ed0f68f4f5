"""Files and directories, compared against the host snapshot instead of one fact per path."""

from __future__ import annotations

import hashlib
import re
import shlex
import tarfile
from functools import lru_cache
from io import BytesIO, StringIO
from typing import Any

from paramiko import SSHException
from pyinfra import host, logger, state
from pyinfra.api import FunctionCommand, StringCommand, operation
from pyinfra.api.exceptions import ConnectError
from pyinfra.facts.files import FileContents
from pyinfra.operations.util.files import generate_color_diff

from ..desired import WantedDir, WantedFile, WantedLink
from ..facts.files import PathState
from ..reachability import UploadCommand


def sha256_of(content: str | bytes) -> str:
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


def _owner_mode(path: str, mode: str, user: str, group: str) -> StringCommand:
    q = shlex.quote(path)
    return StringCommand(f"chown {shlex.quote(user)}:{shlex.quote(group)} {q} && chmod {mode} {q}")


@operation()
def managed_files(files: list[WantedFile], current: dict[str, PathState], secret: bool = False):
    """
    Put each file's content in place with an explicit owner and mode, where the snapshot differs.

    + files: what each file should hold; content is text, or bytes (wheels)
    + current: the host snapshot's path states (a path missing there is absent on the host)
    + secret: never show the content, not even with --diff; upload beside the path (whose directory
      must be private) instead of through /tmp

    pyinfra's files.put reads one fact per file and defaults to mode 0600 without `mode=`; this
    compares checksums from the one batched snapshot and always sets owner and mode.

    **Example:**

    .. code:: python

        managed_files(name="Job files", files=[WantedFile("/shared/jobs/nemotron.sbatch", text, "644")],
                      current=snapshot["paths"])
    """
    for f in files:
        have = current.get(f.path)
        if content_differs(f, have):
            if state.config.DIFF and not secret and isinstance(f.content, str):
                _show_diff(f, have)
            stream = StringIO(f.content) if isinstance(f.content, str) else BytesIO(f.content)
            temp = f"{f.path}.upload" if secret else host.get_temp_filename(f.path)
            yield UploadCommand(stream, f.path, remote_temp_filename=temp)
            yield _owner_mode(f.path, f.mode, f.user, f.group)
        elif (have.mode, have.user, have.group) != (f.mode, f.user, f.group):
            yield _owner_mode(f.path, f.mode, f.user, f.group)


@operation()
def managed_directories(dirs: list[WantedDir], current: dict[str, PathState]):
    """
    Create missing directories with their owner and mode, all in one command.

    A directory that already exists keeps its owner and mode unless the deploy owns it by name
    (`adopt`): pointing a setting at /etc must never hand /etc to another user.

    + dirs: parents before children
    + current: the host snapshot's path states

    **Example:**

    .. code:: python

        managed_directories(name="Job dirs", dirs=[WantedDir("/shared/jobs", "755", adopt=True)],
                            current=snap["paths"])
    """
    steps = _dir_steps(dirs, current)
    if steps:
        yield StringCommand(" && ".join(steps))


def _dir_steps(dirs: list[WantedDir], current: dict[str, PathState]) -> list[str]:
    steps = []
    for d in dirs:
        have = current.get(d.path)
        q, owner = shlex.quote(d.path), f"{shlex.quote(d.user)}:{shlex.quote(d.group)}"
        if have is None:
            # Created, never adopted: mkdir fails if anything took the name since the read (another
            # account in a sticky scratch dir), where install -d would adopt it or follow its link.
            # Missing parents (rare: a shared_dir not made yet) are made root's first. A directory
            # root made since the read is ours (this deploy's image import on shared storage makes
            # <deploy>/images, so <deploy> too, before the login node's files): a real directory,
            # not a link, owned by root; anything else fails the step.
            parent = shlex.quote(d.path.rsplit("/", 1)[0] or "/")
            made_by_root = f'{{ [ -d {q} ] && [ ! -L {q} ] && [ "$(stat -c %u -- {q})" = 0 ]; }}'
            steps.append(
                f"{{ [ -d {parent} ] || install -d -m 755 {parent}; }} "
                f"&& {{ mkdir -m {d.mode} -- {q} || {made_by_root}; }} "
                f"&& chown -h {owner} -- {q} && chmod {d.mode.zfill(5)} -- {q}"
            )
        elif d.adopt and (have.kind, have.mode, have.user, have.group) != (
            "directory",
            d.mode,
            d.user,
            d.group,
        ):
            # Ours (the preflight refused it if it were a link or another account's): owner and mode.
            # 5 digits: GNU chmod clears a directory's set-group-ID bit only when told explicitly.
            steps.append(f"chown -h {owner} -- {q} && chmod {d.mode.zfill(5)} -- {q}")
    return steps


def _link_steps(links: list[WantedLink], current: dict[str, PathState]) -> list[str]:
    steps = []
    for link in links:
        have = current.get(link.path)
        if have is None or have.kind != "link" or have.sha256 != link.target:
            # -n: replace a link, never follow it; -T: refuse to write into a directory of that name.
            steps.append(f"ln -sfnT {shlex.quote(link.target)} {shlex.quote(link.path)}")
    return steps


def tree_in_place(
    dirs: list[WantedDir], files: list[WantedFile], links: list[WantedLink], current: dict[str, PathState]
) -> bool:
    """True when the snapshot shows what ``managed_tree`` would leave: it would send no command.

    The deploy then doesn't call the operation on that host. Each call costs pyinfra a walk of
    the call stack (``inspect.stack()``, 3-8 ms a host), and on 64 nodes those calls were a
    fifth of a no-change re-deploy.
    """
    return not (
        _dir_steps(dirs, current)
        or _link_steps(links, current)
        or any(_file_differs(f, current.get(f.path)) for f in files)
    )


def _file_differs(f: WantedFile, have: PathState | None) -> bool:
    return content_differs(f, have) or (have.mode, have.user, have.group) != (f.mode, f.user, f.group)


@lru_cache(maxsize=4)
def _bundle(contents: tuple[str | bytes, ...]) -> bytes:
    """A tar of ``contents`` as members 0, 1, ...: one upload per host instead of one per file (each
    SFTP file costs its own open/stat/close round trips). Every compute node gets the same bytes."""
    out = BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, content in enumerate(contents):
            data = content.encode() if isinstance(content, str) else content
            member = tarfile.TarInfo(str(i))
            member.size, member.mode = len(data), 0o600
            tar.addfile(member, BytesIO(data))
    return out.getvalue()


def content_differs(f: WantedFile, have: PathState | None) -> bool:
    return have is None or have.kind != "file" or have.sha256 != sha256_of(f.content)


def _show_diff(f: WantedFile, have: PathState | None) -> None:
    """Only with --diff: one more read, for the old text of a file that changes."""
    old = [f"{line}\n" for line in host.get_fact(FileContents, path=f.path) or []] if have else []
    host.log(f"Will {'create' if have is None else 'modify'} {f.path}", logger.info)
    for line in generate_color_diff(old, f.content.splitlines(keepends=True)):
        logger.info("  %s", line)


@operation()
def managed_tree(
    dirs: list[WantedDir],
    files: list[WantedFile],
    links: list[WantedLink],
    current: dict[str, PathState],
    then: tuple[StringCommand, ...] = (),
):
    """
    Directories, files and links of one host in one operation and one shell command.

    Changed files travel in one upload (a tar, over SFTP: no shell, no barrier between hosts) to
    the host's temp dir, which exists before the deploy's directories do; then one command unpacks
    it into a private directory, creates the missing directories, copies each file beside its
    path, sets owner and mode, renames it into place (atomic: a reader sees the old file or the new
    one, never half of it), and points the links. Not for secrets (the upload passes through the
    temp dir): `managed_files` with ``secret=True``.

    + dirs: parents before children (see ``managed_directories``)
    + files: what each file should hold; content is text, or bytes (wheels)
    + links: symlinks the deploy owns
    + current: the host snapshot's path states (a path missing there is absent on the host)
    + then: commands that need the tree in place, run after it in this operation (the login node's
      health venv install: as an operation of its own it waited for every compute node's uploads)

    **Example:**

    .. code:: python

        managed_tree(name="Job files", dirs=want.dirs, files=want.files, links=want.links,
                     current=snapshot["paths"])
    """
    steps = _dir_steps(dirs, current)
    changed = [f for f in files if content_differs(f, current.get(f.path))]
    if changed:
        if state.config.DIFF:
            for f in changed:
                if isinstance(f.content, str):
                    _show_diff(f, current.get(f.path))
        data = _bundle(tuple(f.content for f in changed))
        steps.append('tar -xf "$unpacked/bundle.tar" -C "$unpacked" && rm -f "$unpacked/bundle.tar"')
    member = {f.path: i for i, f in enumerate(changed)}
    for f in files:
        have = current.get(f.path)
        if f.path in member:
            q, new = shlex.quote(f.path), shlex.quote(f"{f.path}.nemotron-new")
            owner = f"-o {shlex.quote(f.user)} -g {shlex.quote(f.group)} -m {f.mode}"
            steps.append(f'install {owner} "$unpacked/{member[f.path]}" {new} && mv -f {new} {q}')
        elif (have.mode, have.user, have.group) != (f.mode, f.user, f.group):
            steps.append(str(_owner_mode(f.path, f.mode, f.user, f.group)))
    if changed:
        steps.append('rm -rf "$unpacked"')
    steps += _link_steps(links, current)
    if changed:
        yield FunctionCommand(_upload_then_run, (data, " && ".join(steps)), {})
    elif steps:
        yield StringCommand(" && ".join(steps))
    yield from then


PRIVATE_DIR = re.compile(r"^/tmp/nemotron-deploy\.[A-Za-z0-9]+$")


def _upload_then_run(state: Any, host: Any, data: bytes, command: str) -> bool:
    """`_upload_then_run_in_private_dir`; a connection lost on the way fails this host alone, as any
    command's would (pyinfra reports an exception from a Python callback as an unexpected error,
    with a traceback, where reachability.report_unreachable_hosts names the host and its address)."""
    try:
        return _upload_then_run_in_private_dir(state, host, data, command)
    except (SSHException, ConnectError, EOFError) as exc:
        host.log_styled(f"placing the files failed: the connection was lost ({exc})", fg="red")
        return False


def _upload_then_run_in_private_dir(state: Any, host: Any, data: bytes, command: str) -> bool:
    """Upload `data` into a directory made for this run (mktemp -d: 0700, a name no one can guess
    or take first) and run `command` with it as $unpacked. Never a fixed /tmp path: another account
    could create it first, as a link to a file root would then overwrite, or a bundle root unpacks."""
    ok, out = host.run_shell_command(StringCommand("mktemp -d /tmp/nemotron-deploy.XXXXXXXXXX"))
    private = out.stdout.strip() if ok else ""
    if not PRIVATE_DIR.match(private):
        host.log_styled(f"could not make a private upload directory: {out.stderr or private}", fg="red")
        return False
    upload = UploadCommand(
        BytesIO(data), f"{private}/bundle.tar", remote_temp_filename=f"{private}/bundle.tar"
    )
    if not upload.execute(state, host, {}):
        host.run_shell_command(StringCommand(f"rm -rf {shlex.quote(private)}"))
        return False
    ok, out = host.run_shell_command(StringCommand(f"unpacked={shlex.quote(private)} && {command}"))
    if not ok:
        # Say what failed: pyinfra reports a FunctionCommand's failure as "executed 0 commands" only.
        host.log_styled(f"placing the files failed: {(out.stderr or out.stdout)[-2000:]}", fg="red")
        host.run_shell_command(StringCommand(f"rm -rf {shlex.quote(private)}"))
    return ok
