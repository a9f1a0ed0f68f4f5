"""NeMo's own HTTP server, for tests that hold the stand-in (``emulator.py``) up against it.

``rehearsal/vendor/nemo_toolkit-1.23.0/text_generation_server.py`` is NeMo's module verbatim (see the
README beside it). Run as a script, this file loads it with stand-ins for what it imports besides Flask
and flask-restful (``torch``, NeMo's logging, the RETRO strategies and ``generate``) and serves it with
its own ``MegatronServer(model).run("127.0.0.1", 0)``: Flask's development server on loopback, as
``megatron_gpt_eval.py server=True`` runs it (``app.run(url, threaded=True, port=port, debug=False)``).
Werkzeug's start-up log line on stderr tells the port.

Only the model is fake. ``generate`` returns NeMo's output shape (``sentences``, ``tokens``,
``logprob``, ``full_logprob``, ``token_ids``, ``offsets``) with made-up values, and raises, as the
stand-in's model does, when ``sentences`` is not a non-empty list of strings that UTF-8 can encode
(what the tokenizer does then is the model's business, not the HTTP layer's that is checked here).

:func:`start` runs it in a subprocess (so that the stubs never enter the test process's
``sys.modules``) and needs ``flask``, ``werkzeug`` and ``flask-restful`` at the versions pinned in the
``dev`` extra of pyproject.toml, which ``scripts/setup`` installs: nothing is downloaded here.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENDORED = ROOT / "rehearsal" / "vendor" / "nemo_toolkit-1.23.0" / "text_generation_server.py"
MODULE = "nemo.collections.nlp.modules.common.text_generation_server"
REQUIRED = ("flask", "werkzeug", "flask_restful")
# The versions the stand-in copies (pinned in pyproject.toml's dev extra): another Flask may answer
# otherwise, and the comparison would then hold the stand-in to the wrong server.
PINNED = {"flask": "3.0.2", "werkzeug": "3.0.1", "flask-restful": "0.3.10"}
SETUP_HINT = (
    "run scripts/setup (or: .venv/bin/pip install -e '.[dev]'), which installs the versions pinned in "
    "pyproject.toml's dev extra"
)


def missing_requirements() -> str | None:
    """Why the reference cannot run here, or None when it can."""
    if not VENDORED.is_file():
        return f"NeMo's server module is missing: {VENDORED} (vendored from nemo_toolkit 1.23.0)"
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not importable by {sys.executable}: {SETUP_HINT}"
    found = {name: importlib.metadata.version(name) for name in PINNED}
    if found != PINNED:
        return f"found {found}, the reference is {PINNED}: {SETUP_HINT}"
    return None


# --------------------------------------------------------------------------------------------------
# The stubs (script mode only)
# --------------------------------------------------------------------------------------------------


def _fake_generate(model, inputs, tokens_to_generate, all_probs, *args, **kwargs):  # noqa: ANN001
    """NeMo's ``generate()`` output shape, without a model."""
    if not isinstance(inputs, list) or not inputs or not all(isinstance(s, str) for s in inputs):
        raise TypeError("stub generate(): sentences must be a non-empty list of str, as NeMo's tokenizer")
    for s in inputs:
        s.encode("utf-8")  # SentencePiece takes UTF-8: a lone surrogate (a JSON escape) raises
    n = tokens_to_generate if isinstance(tokens_to_generate, int) and tokens_to_generate < 8 else 8
    tokens = [[f"▁t{i}" for i in range(n + 1)] for _ in inputs]
    return {
        "sentences": [s + "".join(f" t{i}" for i in range(n)) for s in inputs],
        "tokens": tokens,
        "logprob": [[-0.5] * n for _ in inputs] if kwargs.get("compute_logprob") else None,
        "full_logprob": [[[-0.5, -1.5]] * n for _ in inputs] if all_probs else None,
        "token_ids": [list(range(1000, 1001 + n)) for _ in inputs],
        "offsets": [list(range(n + 1)) for _ in inputs],
    }


def _stub_modules() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries standing in for everything the server module imports but Flask."""
    mods: dict[str, types.ModuleType] = {}

    def mod(name: str, **attrs: object) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        mods[name] = m
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, m)
        else:
            m.__path__ = []  # a package, so that submodules resolve
        return m

    class Tensor:
        def __init__(self, data: object) -> None:
            self.data = data

        def tolist(self) -> object:
            return self.data

    mod("torch", Tensor=Tensor)
    mod("torch.cuda", LongTensor=Tensor)
    mod("torch.distributed", broadcast=lambda tensor, src: None)

    class RetroModelTextGenerationStrategy:
        pass

    class RetroQAModelTextGenerationStrategy:
        pass

    for name in ("nemo", "nemo.collections", "nemo.collections.nlp", "nemo.collections.nlp.modules"):
        mod(name).__path__ = []
    mod("nemo.collections.nlp.modules.common").__path__ = []
    mod(
        "nemo.collections.nlp.modules.common.retro_inference_strategies",
        RetroModelTextGenerationStrategy=RetroModelTextGenerationStrategy,
        RetroQAModelTextGenerationStrategy=RetroQAModelTextGenerationStrategy,
    )
    mod("nemo.collections.nlp.modules.common.text_generation_utils", generate=_fake_generate)
    mod("nemo.utils", logging=logging.getLogger("nemo"))
    return mods


def load_server_module() -> types.ModuleType:
    """NeMo's ``text_generation_server`` module, imported from the vendored file over the stubs."""
    sys.modules.update(_stub_modules())
    spec = importlib.util.spec_from_file_location(MODULE, VENDORED)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE] = module  # Flask(__name__) finds its root_path (static folder) from here
    spec.loader.exec_module(module)
    return module


def main() -> int:
    problem = missing_requirements()
    if problem:
        print(f"nemo_reference: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = load_server_module().MegatronServer(model=object())
    server.run("127.0.0.1", 0)  # port 0: Werkzeug logs the one it got
    return 0


# --------------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start(log_path: Path, env: dict[str, str] | None = None, timeout: float = 30.0) -> Iterator[int]:
    """Run NeMo's server in a subprocess on 127.0.0.1; yield its port. Its output goes to ``log_path``."""
    with open(log_path, "wb") as log_file:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLASK_", "WERKZEUG_"))}
        env = {**clean, **(env or {})}
        proc = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(rb"Running on http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
            if m:
                yield int(m.group(1))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"NeMo's server did not start (exit {proc.poll()}):\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    sys.exit(main())
