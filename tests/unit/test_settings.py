"""Every setting is documented, and `nemotron-deploy settings` prints that documentation.

The schema (nemotron_deploy/settings.py, ClusterSettings) is the one source: each field has a
description and a group; `nemotron-deploy settings [--json]` lists them with type and default.
"""

from __future__ import annotations

import json
import re

import pytest
from helpers import INVENTORIES, REPO, run_main

from nemotron_deploy.settings import ClusterSettings, reference

FIELDS = list(ClusterSettings.model_fields)
# The groups of the model, in its order (the `# --- ...` comments in settings.py).
GROUPS = [
    "what runs where",
    "Slurm",
    "paths on the cluster",
    "container",
    "server",
    "endpoint (login node)",
    "scheduled health check (login node)",
    "keeping the service up (login node)",
    "deploy switches",
]


@pytest.mark.parametrize("name", FIELDS)
def test_every_setting_has_a_description(name):
    description = ClusterSettings.model_fields[name].description
    assert description and description.strip(), f"{name} has no description"
    assert len(description) >= 30, f"{name}'s description says too little: {description!r}"


@pytest.mark.parametrize("name", FIELDS)
def test_every_setting_is_in_a_group(name):
    extra = ClusterSettings.model_fields[name].json_schema_extra
    assert isinstance(extra, dict) and extra.get("group") in GROUPS, f"{name} has no group"


def test_groups_follow_the_model_order():
    """A group is one run of fields, as the comments in the model group them."""
    groups = [ClusterSettings.model_fields[n].json_schema_extra["group"] for n in FIELDS]
    runs = [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g]
    assert runs == GROUPS
    source = (REPO / "nemotron_deploy" / "settings.py").read_text()
    comments = re.findall(r"^    # --- (.+)$", source, re.M)
    for group in GROUPS:
        assert any(c.startswith(group) for c in comments), f"no `# --- {group}` comment in the model"


def test_reference_lists_every_setting_in_model_order():
    rows = reference()
    assert [r["name"] for r in rows] == FIELDS
    for row in rows:
        assert set(row) == {"name", "group", "type", "default", "required", "description"}
    by_name = {r["name"]: r for r in rows}
    assert by_name["port"]["default"] == 1424
    assert by_name["port"]["type"] == "int (1024..65535)"
    assert by_name["gpu_type"]["required"] is True and by_name["gpu_type"]["default"] is None
    assert by_name["job_env"]["default"]["NCCL_DEBUG"] == "WARN"  # a default_factory, called
    assert by_name["mode"]["type"] == "'serve' | 'smoke'"
    assert by_name["slurm_account"]["type"] == "name | None"
    assert by_name["gpus_per_node"]["type"] == "int (> 0) | None"


def test_settings_command_prints_every_setting_with_its_default(capsys):
    assert run_main(["settings"]) == 0
    out = capsys.readouterr().out
    for row in reference():
        default = "required" if row["required"] else f"default {row['default']!r}"
        header = f"{row['name']}: {row['type']}, {default}"
        assert re.search(rf"^  {re.escape(header)}$", out, re.M), f"no line {header!r} in:\n{out}"
        # the description's first words, wrapped under it
        assert row["description"].split()[0] in out
    headings = re.findall(r"^(\S.*)$", out, re.M)
    assert headings == GROUPS


def test_settings_command_json(capsys):
    assert run_main(["settings", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in report["settings"]] == FIELDS
    assert report["settings"] == json.loads(json.dumps(reference()))
    assert [g for g in dict.fromkeys(s["group"] for s in report["settings"])] == GROUPS


def test_settings_command_help(capsys):
    assert run_main(["settings", "--help"]) == 0
    assert "usage: nemotron-deploy settings" in capsys.readouterr().out


def test_docs_point_at_the_settings_command():
    for path in (INVENTORIES / "group_data" / "all.py", REPO / "README.md"):
        assert "nemotron-deploy settings" in path.read_text(), (
            f"{path} doesn't name `nemotron-deploy settings`"
        )
