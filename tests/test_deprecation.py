"""The deprecation helper (lesionbench.deprecation): what a deprecated name says, where the warning
points, that it still works, and that a user sees it without asking."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from lesionbench.deprecation import LesionbenchDeprecationWarning, deprecated, warn_deprecated


@deprecated(since="0.2.0", removed_in="0.4.0", use="lesionbench.load_results")
def old_sum(a, b=10):
    """Add two numbers."""
    return a + b


@deprecated(since="0.2", removed_in="1.0")
class OldThing:
    """A thing."""

    def __init__(self, x):
        self.x = x


def test_a_deprecated_function_warns_once_with_its_releases_and_replacement_and_still_works():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert old_sum(1, b=2) == 3
    assert len(caught) == 1
    w = caught[0]
    assert w.category is LesionbenchDeprecationWarning
    assert str(w.message) == (
        f"{__name__}.old_sum is deprecated since lesionbench 0.2.0 and will be removed in 0.4.0; "
        "use lesionbench.load_results instead"
    )
    assert w.filename == __file__  # it points at the caller, not at the helper


def test_the_wrapper_keeps_name_and_docstring_and_the_docstring_says_deprecated():
    assert old_sum.__name__ == "old_sum"
    assert old_sum.__doc__.startswith("Add two numbers.")
    assert ".. deprecated:: 0.2.0" in old_sum.__doc__ and "lesionbench.load_results" in old_sum.__doc__


def test_a_deprecated_class_warns_on_instantiation_and_its_subclasses_do_too():
    class Sub(OldThing):
        pass

    with pytest.warns(
        LesionbenchDeprecationWarning,
        match=r"OldThing is deprecated since lesionbench 0\.2 and "
        r"will be removed in 1\.0$",
    ):
        thing = OldThing(5)
    assert thing.x == 5 and isinstance(thing, OldThing)
    with pytest.warns(LesionbenchDeprecationWarning):
        assert Sub(7).x == 7
    assert ".. deprecated:: 0.2" in OldThing.__doc__


def test_warn_deprecated_names_what_the_caller_passes_and_points_at_the_callers_caller():
    def takes_option(**options):
        if "old_key" in options:
            warn_deprecated("study option 'old_key'", since="0.2.0", removed_in="0.3.0")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        takes_option(old_key=1)
        takes_option(new_key=1)
    assert [str(w.message) for w in caught] == [
        "study option 'old_key' is deprecated since lesionbench 0.2.0 and will be removed in 0.3.0"
    ]
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    ("since", "removed_in"), [("0.3.0", "0.3.0"), ("0.3.0", "0.2.9"), ("soon", "1.0"), ("0.2.0", "1")]
)
def test_a_removal_not_after_the_deprecation_or_a_non_release_is_refused_where_declared(since, removed_in):
    with pytest.raises(ValueError):
        deprecated(since=since, removed_in=removed_in)


def test_the_warning_is_shown_by_default_and_can_be_made_an_error():
    code = (
        "from lesionbench.deprecation import deprecated\n"
        "f = deprecated(since='0.2.0', removed_in='0.3.0')(lambda: 42)\n"
        "print(f())\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.strip() == "42"
    assert "LesionbenchDeprecationWarning" in shown.stderr and "will be removed in 0.3.0" in shown.stderr
    error = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert error.returncode == 1 and "42" not in error.stdout
    assert "LesionbenchDeprecationWarning" in error.stderr
