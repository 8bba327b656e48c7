"""Every fenced Python example in a public docstring runs."""

import inspect
import re

import keras
import pytest

import fitcustom


def _examples():
    found = []
    for name in fitcustom.__all__:
        obj = getattr(fitcustom, name)
        if inspect.ismodule(obj):
            members = [obj]
        elif inspect.isclass(obj):
            # Its own methods and those of the fitcustom mixins it is
            # assembled from (an inherited method's example runs once,
            # under the class that defines it).
            owners = {
                c.__name__
                for c in obj.__mro__
                if c.__module__.startswith("fitcustom")
                and (c is obj or not issubclass(c, keras.Model))
            }
            members = [obj] + [
                m
                for _, m in inspect.getmembers(obj, inspect.isfunction)
                if m.__qualname__.split(".")[0] in owners
                and m.__module__.startswith("fitcustom")
            ]
        elif inspect.isfunction(obj):
            members = [obj]
        else:
            continue
        for member in members:
            doc = inspect.getdoc(member) or ""
            for i, block in enumerate(
                re.findall(r"```python\n(.*?)```", doc, flags=re.S)
            ):
                label = getattr(member, "__qualname__", member.__name__)
                found.append(pytest.param(block, id=f"{label}[{i}]"))
    return found


@pytest.mark.parametrize("block", _examples())
def test_docstring_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "<docstring example>", "exec"), {"__name__": "doc"})
