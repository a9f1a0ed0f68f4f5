"""The tests that run the model card's own client find it through NEMOTRON_MODEL_CARD_CLIENT.

A clone has no model card beside it: unset, those tests skip and say how to run them; set to a file
that isn't there, they fail (a CI set-up mistake must not pass as a skip). .ci/run sets it.
"""

from __future__ import annotations

import re

import pytest
from helpers import MODEL_CARD_CLIENT_ENV, REPO, model_card_client


def test_unset_skips_saying_how_to_run_them(monkeypatch):
    monkeypatch.delenv(MODEL_CARD_CLIENT_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as info:
        model_card_client()
    reason = str(info.value)
    assert MODEL_CARD_CLIENT_ENV in reason and "call_server.py" in reason


def test_empty_counts_as_unset(monkeypatch):
    monkeypatch.setenv(MODEL_CARD_CLIENT_ENV, "")
    with pytest.raises(pytest.skip.Exception):
        model_card_client()


def test_set_to_a_missing_file_fails(monkeypatch, tmp_path):
    missing = tmp_path / "call_server.py"
    monkeypatch.setenv(MODEL_CARD_CLIENT_ENV, str(missing))
    with pytest.raises(pytest.fail.Exception) as info:
        model_card_client()
    assert str(missing) in str(info.value) and MODEL_CARD_CLIENT_ENV in str(info.value)


def test_set_to_the_client_returns_it(monkeypatch, tmp_path):
    client = tmp_path / "call_server.py"
    client.write_text("print('hello')\n")
    monkeypatch.setenv(MODEL_CARD_CLIENT_ENV, str(client))
    assert model_card_client() == client


def test_no_test_reaches_for_a_folder_beside_the_repository():
    """A newcomer's clone has nothing beside it: only the helper, through the variable, finds the client."""
    for path in [*(REPO / "tests").rglob("*.py"), *(REPO / "bench").glob("*.py")]:
        text = path.read_text()
        assert not re.search(r"REPO\.parent\s*/|parents\[2\]", text), f"{path} looks outside the repository"


def test_ci_sets_the_variable_before_the_tests():
    script = (REPO / ".ci" / "run").read_text()
    assert f"export {MODEL_CARD_CLIENT_ENV}=" in script
    assert "../shared/model-card/call_server.py" in script
    assert script.index(MODEL_CARD_CLIENT_ENV) < script.index("scripts/test")
