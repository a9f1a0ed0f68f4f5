"""./config.py: pyinfra reads it before making its pools; every host of a large cluster at once."""

from __future__ import annotations

from pathlib import Path

from pyinfra.api import Config
from pyinfra.api.state import MAX_PARALLEL
from pyinfra.context import ctx_config

CONFIG = Path(__file__).resolve().parents[2] / "config.py"


def test_the_deploy_reads_every_host_at_once_not_in_waves_of_20_per_cpu():
    config = Config()
    with ctx_config.use(config):
        exec(compile(CONFIG.read_text(), str(CONFIG), "exec"), {"__file__": str(CONFIG)})
    # pyinfra's default (PARALLEL 0) becomes min(20 x CPUs, hosts): 40 on 2 cores, below 65 hosts.
    assert config.PARALLEL == MAX_PARALLEL >= 65
