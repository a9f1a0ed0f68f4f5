"""What a deploy finds on the sandbox in place of NeMo and the checkpoint.

- On every compute node, /opt/NeMo/examples/nlp/language_modeling/megatron_gpt_eval.py (node-local
  /opt, where the NeMo container has it) is a verbatim copy of `rehearsal/nemotron_rehearsal/emulator.py`, the
  stdlib-only emulator of NeMo's text-generation server, and so is
  /opt/NeMo/nemo/collections/nlp/modules/common/text_generation_server.py, the module the script
  imports `MegatronServer` from. /usr is the host's (read-only) on the nodes, so no .pth file puts
  /opt/NeMo on Python's path there: the sandbox inventory's host runtime sets PYTHONPATH=/opt/NeMo in
  `job_env`, as a site running NeMo from a source tree does. Until emulator.py exists, a placeholder
  that exits with an explanation is installed instead (`up` says so).
- On the shared dir, `models/Nemotron-4-340B-Base/` (and `-Instruct/`) hold the real checkpoint's
  model_config.yaml values (package data `model_config.yaml`), an empty `model_weights/` and a tiny
  real SentencePiece model in place of the checkpoint's tokenizer (`nemotron_rehearsal.tokenizer`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from . import image, nodes
from .layout import NODE_EMULATOR_PATH, Node, Sandbox

HERE = Path(__file__).resolve().parent
EMULATOR = HERE.parent / "emulator.py"
MODEL_CONFIG = HERE / "model_config.yaml"
TOKENIZER_NAME = "nemotron_2_256k.model"
PLACEHOLDER = """\
#!/usr/bin/python3
# Placeholder installed by the nemotron-deploy sandbox: rehearsal/nemotron_rehearsal/emulator.py did not exist when
# the sandbox came up. Install it and run `nemotron-deploy sandbox down && nemotron-deploy sandbox up`.
import sys

sys.exit("megatron_gpt_eval.py: sandbox placeholder, the NeMo emulator (rehearsal/nemotron_rehearsal/emulator.py) is missing")
"""


def emulator_available() -> bool:
    return EMULATOR.is_file()


def emulator_bytes() -> bytes:
    """What the nodes (runtime host) and the stand-in image (every container runtime) run as NeMo."""
    return EMULATOR.read_bytes() if emulator_available() else PLACEHOLDER.encode()


def install_emulator(node: Node, *, only_if_changed: bool = False) -> None:
    emulator = emulator_bytes()
    nodes.install_file(node, NODE_EMULATOR_PATH, emulator, 0o755, only_if_changed=only_if_changed)
    for rel, data in image.nemo_package(emulator).items():
        nodes.install_file(node, "/" + rel, data, 0o644, only_if_changed=only_if_changed)


INSTRUCT_NAME = "Nemotron-4-340B-Instruct"


def install_model(sandbox: Sandbox) -> None:
    """Base at sandbox.model_dir and Instruct beside it (same architecture): model_config.yaml, an
    empty model_weights/, and a real SentencePiece model where the checkpoint's tokenizer is (a tiny
    stand-in trained here, nemotron_rehearsal.tokenizer: the replica front loads it)."""
    from .. import tokenizer

    for model in (sandbox.model_dir, sandbox.model_dir.parent / INSTRUCT_NAME):
        (model / "model_weights").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(MODEL_CONFIG, model / "model_config.yaml")
        tokenizer.train(model / TOKENIZER_NAME)
