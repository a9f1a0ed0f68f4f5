"""Files and directories, compared against the host snapshot instead of one fact per path."""

from __future__ import annotations

import hashlib
import shlex
from io import BytesIO, StringIO

from pyinfra import host, logger, state
from pyinfra.api import StringCommand, operation
from pyinfra.facts.files import FileContents
from pyinfra.operations.util.files import generate_color_diff

from ..facts.files import PathState
from ..reachability import UploadCommand


def sha256_of(content: str | bytes) -> str:
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


def _owner_mode(path: str, mode: str, user: str, group: str) -> StringCommand:
    q = shlex.quote(path)
    return StringCommand(f"chown {shlex.quote(user)}:{shlex.quote(group)} {q} && chmod {mode} {q}")


@operation()
def managed_files(
    files: list[tuple[str, str | bytes, str, str, str]],
    current: dict[str, PathState],
    secret: bool = False,
):
    """
    Put each file's content in place with an explicit owner and mode, where the snapshot differs.

    + files: (path, content, mode, user, group); content is text, or bytes (wheels)
    + current: the host snapshot's path states (a path missing there is absent on the host)
    + secret: never show the content, not even with --diff; upload beside the path (whose directory
      must be private) instead of through /tmp

    pyinfra's files.put reads one fact per file and defaults to mode 0600 without `mode=`; this
    compares checksums from the one batched snapshot and always sets owner and mode.

    **Example:**

    .. code:: python

        managed_files(name="Job files", files=[("/shared/jobs/nemotron.sbatch", text, "644", "root", "root")],
                      current=snapshot["paths"])
    """
    for path, content, mode, user, group in files:
        have = current.get(path)
        if have is None or have.sha256 != sha256_of(content):
            if state.config.DIFF and not secret and isinstance(content, str):
                # Only with --diff: one more read, for the old text of a file that changes.
                old = [f"{line}\n" for line in host.get_fact(FileContents, path=path) or []] if have else []
                host.log(f"Will {'create' if have is None else 'modify'} {path}", logger.info)
                for line in generate_color_diff(old, content.splitlines(keepends=True)):
                    logger.info("  %s", line)
            stream = StringIO(content) if isinstance(content, str) else BytesIO(content)
            temp = f"{path}.upload" if secret else host.get_temp_filename(path)
            yield UploadCommand(stream, path, remote_temp_filename=temp)
            yield _owner_mode(path, mode, user, group)
        elif (have.mode, have.user, have.group) != (mode, user, group):
            yield _owner_mode(path, mode, user, group)


@operation()
def managed_directories(dirs: list[tuple[str, str, str, str]], current: dict[str, PathState]):
    """
    Create directories and fix their owner/mode, all in one command, only where the snapshot differs.

    + dirs: (path, mode, user, group) tuples, parents before children
    + current: the host snapshot's path states

    **Example:**

    .. code:: python

        managed_directories(name="Job dirs", dirs=[("/shared/jobs", "755", "root", "root")],
                            current=snap["paths"])
    """
    steps = []
    for path, mode, user, group in dirs:
        have = current.get(path)
        if (
            have is not None
            and have.kind == "directory"
            and (have.mode, have.user, have.group) == (mode, user, group)
        ):
            continue
        q = shlex.quote(path)
        steps.append(
            f"mkdir -p {q} && chown {shlex.quote(user)}:{shlex.quote(group)} {q} && chmod {mode} {q}"
        )
    if steps:
        yield StringCommand(" && ".join(steps))
