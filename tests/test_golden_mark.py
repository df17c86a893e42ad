"""conftest's ``golden`` mark: a test whose data is missing skips with the reason, and fails where CI is set."""

from __future__ import annotations

import pytest

import conftest


class Item:
    """What ``pytest_runtest_setup`` reads of a test: its marks."""

    def __init__(self, *marks: pytest.MarkDecorator) -> None:
        self.marks = [m.mark for m in marks]

    def iter_markers(self, name: str):
        return (m for m in self.marks if m.name == name)


@pytest.mark.parametrize("ci", [False, True])
def test_missing_golden_data_skips_locally_and_fails_in_ci(tmp_path, monkeypatch, ci):
    monkeypatch.setattr(conftest, "IN_CI", ci)
    monkeypatch.setenv("CI", "1" if ci else "")
    outcome = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(outcome) as info:
        conftest.pytest_runtest_setup(Item(pytest.mark.golden(tmp_path / "nowhere", "the golden data")))
    assert f"the golden data is not at {tmp_path / 'nowhere'}" in str(info.value)
    assert ("golden test without its data in CI" in str(info.value)) is ci
    with pytest.raises(outcome, match="'not_a_module_lesionbench_ships' is not installed"):
        conftest.pytest_runtest_setup(
            Item(pytest.mark.golden(tmp_path, "here", modules=["not_a_module_lesionbench_ships"]))
        )
    conftest.pytest_runtest_setup(Item(pytest.mark.golden(tmp_path, "data that is here", modules=["pytest"])))
    conftest.pytest_runtest_setup(Item())  # no mark: nothing to check


@pytest.mark.parametrize(("value", "ci"), [("", False), ("0", False), ("false", False), ("1", True), ("true", True)])
def test_ci_is_read_from_the_environment(monkeypatch, value, ci):
    import importlib.util

    monkeypatch.setenv("CI", value)
    spec = importlib.util.spec_from_file_location("conftest_again", conftest.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.IN_CI is ci
