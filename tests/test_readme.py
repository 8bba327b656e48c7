"""Every Python snippet in README.md runs, in order, as a reader would."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "README.md has no python snippet"
    monkeypatch.chdir(tmp_path)  # snippets that write files write here
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        try:
            exec(
                compile(block, f"README.md[python block {i}]", "exec"),
                namespace,
            )
        except Exception as e:  # noqa: BLE001 - name the failing block
            raise AssertionError(
                f"README python block {i} failed: {e!r}\n{block}"
            ) from e


def test_readme_commands_exist():
    text = README.read_text()
    commands = re.findall(r"^bash (\S+)", text, flags=re.M)
    assert "scripts/run.sh" in commands and "scripts/test.sh" in commands
    root = README.parent
    for command in commands:
        assert (root / command).is_file(), command
    ci = (root / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci
