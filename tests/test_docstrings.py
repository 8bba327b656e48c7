"""Every fenced Python example in a public docstring runs."""

import inspect
import re

import pytest

import fitcustom


def _examples():
    found = []
    for name in fitcustom.__all__:
        obj = getattr(fitcustom, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        members = (
            [obj]
            + [
                m
                for _, m in inspect.getmembers(obj, inspect.isfunction)
                if m.__qualname__.startswith(obj.__name__ + ".")
            ]
            if inspect.isclass(obj)
            else [obj]
        )
        for member in members:
            doc = inspect.getdoc(member) or ""
            for i, block in enumerate(
                re.findall(r"```python\n(.*?)```", doc, flags=re.S)
            ):
                found.append(
                    pytest.param(block, id=f"{member.__qualname__}[{i}]")
                )
    return found


@pytest.mark.parametrize("block", _examples())
def test_docstring_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "<docstring example>", "exec"), {"__name__": "doc"})
