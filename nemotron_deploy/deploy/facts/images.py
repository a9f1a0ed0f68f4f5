"""Whether a container image is already present in a node's docker/podman storage."""

from __future__ import annotations

import shlex

from .base import ProbeFact


class ImagePresent(ProbeFact):
    """True when `<runtime> image inspect REF` finds the image locally (no registry traffic)."""

    def snippet(self, runtime: str, image: str) -> str:
        tool = shlex.quote(runtime)
        return (
            f"if {tool} image inspect --format '{{{{.Id}}}}' {shlex.quote(image)} >/dev/null 2>&1; "
            "then echo present; else echo absent; fi"
        )

    def process(self, output: list[str]) -> bool:
        return output[-1:] == ["present"]
