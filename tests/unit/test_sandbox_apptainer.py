"""The sandbox's one Apptainer setting: the host's apptainer.conf with root containers asking for no
capability (this machine's bounding set lacks CAP_SYS_RESOURCE, which the default `full` asks for)."""

from __future__ import annotations

from pathlib import Path

import pytest
from nemotron_rehearsal.sandbox import apptainer

HOST_CONF = """\
# ROOT DEFAULT CAPABILITIES: [full/file/no]
# DEFAULT: full
root default capabilities = full

# MEMORY FS TYPE: [tmpfs/ramfs]
memory fs type = tmpfs
"""


def _settings(text: str) -> dict[str, str]:
    return dict(
        (k.strip(), v.strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for k, v in [line.split("=", 1)]
    )


def test_only_root_capabilities_change():
    conf = apptainer.sandbox_conf(HOST_CONF)
    before, after = _settings(HOST_CONF), _settings(conf)
    assert after == {**before, "root default capabilities": "no"}
    assert apptainer.sandbox_conf(conf) == conf  # written again on every `up`: no growth


def test_a_conf_without_the_line_gets_it():
    assert _settings(apptainer.sandbox_conf("memory fs type = tmpfs\n")) == {
        "memory fs type": "tmpfs",
        "root default capabilities": "no",
    }


@pytest.mark.skipif(not Path(apptainer.NODE_CONF).is_file(), reason="no Apptainer installed here")
def test_the_installed_conf_parses_the_same_but_for_that_line():
    host = Path(apptainer.NODE_CONF).read_text()
    assert _settings(apptainer.sandbox_conf(host)) == {**_settings(host), "root default capabilities": "no"}
