"""Every fenced Python example in a public docstring runs."""

import inspect
import re

import pytest

import fitcustom


def _examples():
    found = []
    for name in fitcustom.__all__:
        obj = getattr(fitcustom, name)
        if inspect.ismodule(obj):
            members = [obj]
        elif inspect.isclass(obj):
            members = [obj] + [
                m
                for _, m in inspect.getmembers(obj, inspect.isfunction)
                if m.__qualname__.startswith(obj.__name__ + ".")
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
