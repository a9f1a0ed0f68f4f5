"""Files and directories, compared against the host snapshot instead of one fact per path."""

from __future__ import annotations

import hashlib
import shlex
from io import BytesIO, StringIO

from pyinfra import host, logger, state
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.api.util import generate_color_diff

from ..facts.files import PathState


def sha256_of(content: str | bytes) -> str:
    return hashlib.sha256(content.encode() if isinstance(content, str) else content).hexdigest()


def _owner_mode(path: str, mode: str, user: str, group: str) -> StringCommand:
    q = shlex.quote(path)
    return StringCommand(f"chown {shlex.quote(user)}:{shlex.quote(group)} {q} && chmod {mode} {q}")


@operation()
def managed_file(
    path: str,
    content: str | bytes,
    mode: str,
    user: str,
    group: str,
    current: PathState | None,
    secret: bool = False,
):
    """
    Put `content` at `path` with an explicit owner and mode, unless the snapshot says it is there.

    + path: remote file
    + content: the file's text (or bytes, for wheels)
    + mode/user/group: wanted permissions (pyinfra's files.put would default to 0600)
    + current: this path's entry in the host snapshot (None: absent)
    + secret: never show the content, not even with --diff; upload beside `path` (whose directory
      must be private) instead of through /tmp

    **Example:**

    .. code:: python

        managed_file(name="Install sbatch", path="/shared/jobs/nemotron.sbatch", content=text,
                     mode="644", user="root", group="root", current=snap["paths"].get(path))
    """
    if current is None or current.sha256 != sha256_of(content):
        if state.config.DIFF and not secret and isinstance(content, str):
            host.log(f"Will {'create' if current is None else 'replace'} {path}", logger.info)
            for line in generate_color_diff([], content.splitlines(keepends=True)):
                logger.info("  %s", line)
        stream = StringIO(content) if isinstance(content, str) else BytesIO(content)
        temp = f"{path}.upload" if secret else host.get_temp_filename(path)
        yield FileUploadCommand(stream, path, remote_temp_filename=temp)
        yield _owner_mode(path, mode, user, group)
    elif (current.mode, current.user, current.group) != (mode, user, group):
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
