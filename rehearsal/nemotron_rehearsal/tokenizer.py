"""STAND-IN for the checkpoint's SentencePiece tokenizer (``nemotron_2_256k.model``, 256000 pieces).

The real file comes with the checkpoint; the sandbox and the tests need *a* real SentencePiece model
where the checkpoint's would be, so the replica's front loads it with the real ``sentencepiece``
library. :func:`train` makes a tiny BPE model (about 10 KB, 700 pieces, trained in ~20 ms) whose
pieces agree with the emulator's notion of a token: each generated word (``" word"``, from the
emulator's vocabulary) is one piece and ``<|endoftext|>`` is one piece, so usage counted with this
tokenizer matches what the emulator says it generated, as the checkpoint's tokenizer matches NeMo's.
Any other text is encodable too (byte fallback). Ids as Nemotron's: eos = 3.

Needs ``sentencepiece`` (a dev dependency; NeMo's container has it, and the sandbox's stand-in image gets it).
"""

from __future__ import annotations

import io
from pathlib import Path

from .emulator import _VOCAB, EOD

# Nemotron-4's chat markers, so a rendered Instruct prompt is a few pieces, not bytes.
SPECIAL = [EOD, "<extra_id_0>", "<extra_id_1>", "\n"]
VOCAB_SIZE = 700
PLACEHOLDER_NOTE = "stand-in for the checkpoint's SentencePiece tokenizer (nemotron-deploy rehearsal)"


def model_bytes() -> bytes:
    """The serialized model (deterministic for a given sentencepiece version)."""
    import sentencepiece as spm

    corpus = ["".join(" " + w for w in _VOCAB[i:] + _VOCAB[:i]) for i in range(len(_VOCAB))] * 20
    corpus.append(" abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()-")
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=out,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        user_defined_symbols=SPECIAL,
        unk_id=0,
        bos_id=1,
        pad_id=2,
        eos_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


def train(path: str | Path) -> Path:
    """Write the stand-in tokenizer at `path` (the checkpoint's tokenizer file name) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model_bytes())
    return path
