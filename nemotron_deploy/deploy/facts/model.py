"""A checkpoint's model_config.yaml, read where the job will mount it."""

from __future__ import annotations

import shlex
from functools import lru_cache

import yaml

from ...catalog import load_yaml
from .base import ProbeFact


class ModelConfig(ProbeFact):
    """The parsed model_config.yaml of `model_dir`: a dict, or {"error": "..."} saying what is wrong."""

    def snippet(self, model_dir: str) -> str:
        path = shlex.quote(f"{model_dir}/model_config.yaml")
        return (
            f"if [ ! -d {shlex.quote(model_dir)} ]; then echo @@nodir; "
            f"elif [ ! -r {path} ]; then echo @@noconfig; else cat {path}; fi"
        )

    def process(self, output: list[str]) -> dict:
        if output == ["@@nodir"]:
            return {"error": "the model directory does not exist"}
        if output == ["@@noconfig"]:
            return {"error": "the model directory has no readable model_config.yaml"}
        return dict(_parse("\n".join(output)))


@lru_cache(maxsize=16)
def _parse(text: str) -> dict:
    """Parsed once per distinct text: every node usually reads the same checkpoint on shared storage."""
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        return {"error": f"model_config.yaml is not valid YAML: {exc}"}
    return data if isinstance(data, dict) else {"error": "model_config.yaml is not a mapping"}
