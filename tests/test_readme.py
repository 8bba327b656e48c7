"""Every Python snippet in README.md runs, in order, as a reader would."""

import pathlib
import re
import textwrap

from helpers import finish
from helpers import start

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_snippets_run(tmp_path):
    """All blocks in order, in a fresh process, as a reader would run them."""
    blocks = python_blocks()
    assert blocks, "README.md has no python snippet"
    script = "\n".join(
        f"print('--- README block {i}', flush=True)\n{block}"
        for i, block in enumerate(blocks)
    )
    # A fresh process (forked from one that has imported TensorFlow, see
    # forkserver.py), in a folder of its own; the digits feature extractor
    # is kept under the test run's KERAS_HOME (tests/conftest.py), not in
    # the user's ~/.keras.
    program = tmp_path / "readme_blocks.py"
    program.write_text(script)
    code, out, err = finish(start(["python", program], cwd=tmp_path), 600)
    last = [ln for ln in out.splitlines() if ln.startswith("---")]
    assert code == 0, (
        f"README failed after {last[-1] if last else 'start'}:\n{err[-3000:]}"
    )
    assert len(last) == len(blocks)


def test_readme_commands_exist():
    text = README.read_text()
    commands = re.findall(r"^bash (\S+)", text, flags=re.M)
    assert "scripts/run.sh" in commands and "scripts/test.sh" in commands
    root = README.parent
    for command in commands:
        assert (root / command).is_file(), command
    ci = (root / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_example_excerpts_are_the_programs_code():
    """The README's excerpts of the example programs' steps are the code
    in the files, method for method."""
    excerpts = [
        b for b in python_blocks() if b.startswith("# scripts/examples/")
    ]
    assert len(excerpts) == 4
    for block in excerpts:
        header, body = block.split("\n", 1)
        path = README.parent / header[2:].split(",")[0]
        source = path.read_text()
        methods = re.split(r"\n(?=def )", body.strip())
        assert len(methods) >= 1
        for method in methods:
            indented = textwrap.indent(method.strip() + "\n", "    ")
            assert indented in source, (header, method[:200])
