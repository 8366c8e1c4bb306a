"""Optional test dependencies, so that a missing one skips only the tests that use it.

The GPU image that `make gpu-check` runs on has torch, triton, transformers, safetensors, numpy
and pytest only. A module-level `from hypothesis import ...` there would stop pytest at
collection and take every other test of the module (and the GPU test count) with it. Test
modules import hypothesis' names from here instead: without hypothesis, `@given` turns its test
into one that skips with the reason, and `st` / `settings` / `HealthCheck` are inert stand-ins,
so strategies built at import time (`st.lists(...)`, `@st.composite`) still import.
"""

from __future__ import annotations

import pytest

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:
    HAVE_HYPOTHESIS = False

    class _Inert:
        """Any attribute, call or decoration yields another inert object."""

        def __getattr__(self, name):
            return _Inert()

        def __call__(self, *args, **kwargs):
            return _Inert()

    st = HealthCheck = _Inert()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **kwargs):
        def decorate(test):
            # A fresh zero-argument function (not functools.wraps: pytest would then read the
            # original signature and look for fixtures named like the strategies' arguments).
            def skipped():
                pytest.skip("needs hypothesis (pip install hypothesis)")

            skipped.__name__, skipped.__qualname__ = test.__name__, test.__qualname__
            skipped.__module__, skipped.__doc__ = test.__module__, test.__doc__
            return skipped

        return decorate

__all__ = ["HAVE_HYPOTHESIS", "HealthCheck", "given", "settings", "st"]
