"""Scripts: main(argv) end to end at tiny settings, and bad command lines."""

import csv

import keras
import pytest

import fitcustom
from scripts import train_digits


def test_train_digits_end_to_end(tmp_path):
    out = tmp_path / "digits"
    results = train_digits.main(
        ["--output-dir", str(out), "--epochs", "3", "--verbose", "0"]
    )
    for name in ("model.keras", "history.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and "gradient_norm" in rows[0]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    model = keras.models.load_model(out / "model.keras", safe_mode=True)
    assert isinstance(model, fitcustom.TapeModel)
    assert results["accuracy"] > 0.5
    assert not (out / "backup").exists()  # removed after a finished run


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "-1"], "--epochs must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--epochs", "two"], "invalid int value"),
    ],
)
def test_bad_command_line_exits_with_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        train_digits.main(["--output-dir", str(tmp_path)] + argv)
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]


def test_output_dir_that_is_a_file_exits_cleanly(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to --output-dir"):
        train_digits.main(["--output-dir", str(blocker / "out")])
