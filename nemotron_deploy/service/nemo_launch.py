"""Run NeMo's unchanged ``megatron_gpt_eval.py`` with its HTTP server bound to the node's loopback.

``megatron_gpt_eval.py`` calls ``MegatronServer(model).run("0.0.0.0", port=cfg.port)``: every address
of the node, with no authentication, so any cluster user could call a replica directly and skip the
endpoint. This launcher replaces ``MegatronServer.run`` (NeMo's
``nemo.collections.nlp.modules.common.text_generation_server``) with one that passes ``127.0.0.1``
instead of the address it is given, then runs the script as ``python3 megatron_gpt_eval.py ARGS``
would (``runpy``, as ``__main__``, the same argv and Hydra overrides, the script's directory first on
``sys.path``). Other hosts reach the replica only through ``replica_front`` on the node's own
addresses; the model card's client on the replica's node still calls ``localhost:<port>``.

Shipped as a job file (``nemo_launch.py``, a copy of this module) and run inside the container:

    python3 nemo_launch.py /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py server=True ...

If the module or its ``run`` is missing (a NeMo that serves otherwise), it stops with an error rather
than serve on every address.
"""

from __future__ import annotations

import importlib
import os
import runpy
import sys

SERVER_MODULE = "nemo.collections.nlp.modules.common.text_generation_server"
LOOPBACK = "127.0.0.1"


def bind_loopback(module_name: str = SERVER_MODULE, address: str = LOOPBACK) -> None:
    """Make ``MegatronServer.run(url, port)`` listen on ``address`` whatever ``url`` it is given."""
    module = importlib.import_module(module_name)
    server_class = getattr(module, "MegatronServer", None)
    original = getattr(server_class, "run", None)
    if original is None:
        raise RuntimeError(
            f"{module_name} has no MegatronServer.run: this NeMo serves in a way nemo_launch.py does not know"
        )
    if getattr(original, "nemotron_loopback", False):
        return

    def run(self, url="0.0.0.0", port=5000, *args, **kwargs):  # NeMo's signature: run(self, url, port=5000)
        if url != address:
            print(
                f"nemo_launch: NeMo's server asked for {url}:{port}; listening on {address}:{port} only",
                file=sys.stderr,
                flush=True,
            )
        return original(self, address, port, *args, **kwargs)

    run.nemotron_loopback = True  # type: ignore[attr-defined]
    run.__wrapped__ = original  # type: ignore[attr-defined]
    server_class.run = run


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or not args[0].endswith(".py"):
        print("usage: nemo_launch.py /path/to/megatron_gpt_eval.py [hydra overrides...]", file=sys.stderr)
        return 2
    script = os.path.abspath(args[0])
    if not os.path.isfile(script):
        print(f"nemo_launch: {script} does not exist (check the nemo_dir setting)", file=sys.stderr)
        return 2
    try:
        bind_loopback()
    except (ImportError, RuntimeError) as exc:
        print(
            f"nemo_launch: cannot bind NeMo's server to {LOOPBACK}: {exc}; not starting it", file=sys.stderr
        )
        return 1
    # As `python3 script ARGS`: argv, and the script's directory (not this file's) first on sys.path.
    sys.argv = [script, *args[1:]]
    sys.path[0] = os.path.dirname(script)
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
