"""The file tree operation's decisions, without a host: when a host needs no operation at all, and the
one upload that carries every changed file. (The sandbox tests run it for real: tests/sandbox/test_deploy.py.)"""

from __future__ import annotations

import io
import tarfile

import pytest

from nemotron_deploy.deploy.desired import WantedDir, WantedFile, WantedLink
from nemotron_deploy.deploy.facts.files import PathState
from nemotron_deploy.deploy.operations.files import _bundle, sha256_of, tree_in_place

DIRS = [WantedDir("/opt/nemotron-deploy", "755", adopt=True), WantedDir("/srv/theirs", "755")]
FILES = [
    WantedFile("/opt/nemotron-deploy/run.sh", "#!/bin/sh\n", "755"),
    WantedFile("/opt/w.whl", b"PK\x03", "644"),
]
LINKS = [WantedLink("/srv/theirs/nemotron.prom", "/var/lib/metrics/nemotron.prom")]


def _in_place() -> dict[str, PathState]:
    current = {d.path: PathState(d.path, "directory", d.mode, d.user, d.group) for d in DIRS}
    current |= {
        f.path: PathState(f.path, "file", f.mode, f.user, f.group, sha256_of(f.content)) for f in FILES
    }
    current |= {link.path: PathState(link.path, "link", "777", "root", "root", link.target) for link in LINKS}
    return current


def test_a_tree_that_matches_the_read_needs_no_operation():
    assert tree_in_place(DIRS, FILES, LINKS, _in_place())


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c: c.pop("/opt/nemotron-deploy"), id="a missing directory"),
        pytest.param(
            lambda c: c.update(
                {
                    "/opt/nemotron-deploy": PathState(
                        "/opt/nemotron-deploy", "directory", "700", "root", "root"
                    )
                }
            ),
            id="an adopted directory with another mode",
        ),
        pytest.param(lambda c: c.pop("/opt/w.whl"), id="a missing file"),
        pytest.param(
            lambda c: c.update(
                {"/opt/w.whl": PathState("/opt/w.whl", "file", "644", "root", "root", "0" * 64)}
            ),
            id="a file with other content",
        ),
        pytest.param(
            lambda c: c.update(
                {
                    "/opt/nemotron-deploy/run.sh": PathState(
                        "/opt/nemotron-deploy/run.sh", "file", "644", "root", "root", sha256_of("#!/bin/sh\n")
                    )
                }
            ),
            id="a file with another mode",
        ),
        pytest.param(
            lambda c: c.update(
                {
                    "/srv/theirs/nemotron.prom": PathState(
                        "/srv/theirs/nemotron.prom", "link", "777", "root", "root", "/elsewhere"
                    )
                }
            ),
            id="a link pointing elsewhere",
        ),
    ],
)
def test_any_difference_needs_the_operation(change):
    current = _in_place()
    change(current)
    assert not tree_in_place(DIRS, FILES, LINKS, current)


def test_a_directory_that_is_not_ours_keeps_its_mode_and_needs_nothing():
    current = _in_place()
    current["/srv/theirs"] = PathState("/srv/theirs", "directory", "710", "nobody", "nogroup")
    assert tree_in_place(DIRS, FILES, LINKS, current)


def test_changed_files_travel_as_one_tar_with_one_member_each():
    data = _bundle(("text\n", b"\x00bytes"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [(m.name, m.mode, m.isfile()) for m in members] == [("0", 0o600, True), ("1", 0o600, True)]
        assert [tar.extractfile(m).read() for m in members] == [b"text\n", b"\x00bytes"]
    assert _bundle(("text\n", b"\x00bytes")) == data, (
        "the same files must give the same bytes (cached per run)"
    )
