"""Scripts: main(argv) end to end at tiny settings, resume, bad input."""

import csv
import json
import os
import re
import subprocess
import sys

import keras
import pytest

import fitcustom
from scripts import _common
from scripts import summary as summary_script
from scripts import train_classifier
from scripts import train_gan
from scripts._common import read_csv_history


class Interrupted(Exception):
    pass


def _interrupt_after_epoch(monkeypatch, callback_class, epoch_index):
    """Makes `callback_class` raise at the end of epoch `epoch_index`
    (after BackupAndRestore, which comes before it, has saved)."""
    original = callback_class.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == epoch_index:
            raise Interrupted(f"killed after epoch {epoch}")

    monkeypatch.setattr(callback_class, "on_epoch_end", on_epoch_end)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_train_classifier_end_to_end(tmp_path, model):
    out = tmp_path / model
    results = train_classifier.main(
        [
            "--output-dir",
            str(out),
            "--epochs",
            "3",
            "--verbose",
            "0",
            "--model",
            model,
        ]
    )
    for name in ("model.keras", "history.csv", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))
    history = read_csv_history(out / "history.csv")
    assert len(history["loss"]) == 3 and "gradient_norm" in history
    assert history["loss"][-1] < history["loss"][0]
    loaded = keras.models.load_model(out / "model.keras", safe_mode=True)
    assert isinstance(loaded, fitcustom.TapeClassifier)
    assert results["accuracy"] > 0.3
    assert not (out / "backup").exists()  # removed after a finished run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(results["accuracy"])


def _epochs(out):
    """The epoch column of history.csv, and the history."""
    with open(out / "history.csv", newline="") as f:
        epochs = [int(row["epoch"]) for row in csv.DictReader(f)]
    return epochs, read_csv_history(out / "history.csv")


def test_classifier_resume_then_rerun_keeps_each_epoch_once(
    tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--epochs", "4", "--verbose", "0"]
    # Killed after epoch 2's history row and best model, before its
    # backup (they are written first): the resumed run trains epoch 2
    # again and its row replaces the one written before the kill.
    original = fitcustom.BackupAndRestore.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise Interrupted("killed before the backup of epoch 2")
        original(self, epoch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(fitcustom.BackupAndRestore, "on_epoch_end", on_epoch_end)
        with pytest.raises(Interrupted):
            train_classifier.main(argv)
    assert fitcustom.BackupAndRestore.progress(out / "backup") == (1, 0)
    assert not (out / "summary.json").exists()
    epochs, killed = _epochs(out)
    assert epochs == [0, 1]
    capsys.readouterr()
    train_classifier.main(argv)
    assert "after 1 epoch(s)" in capsys.readouterr().out
    epochs, history = _epochs(out)
    assert epochs == [0, 1, 2, 3]
    assert history["loss"][0] == killed["loss"][0]  # kept, not retrained
    assert not (out / "backup").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 4 and 0 < summary["test_accuracy"] <= 1

    # The same command after the run finished: refused in one line, and
    # nothing is touched.
    before = (out / "history.csv").read_text()
    with pytest.raises(SystemExit, match="holds a finished run; add "):
        train_classifier.main(argv)
    assert (out / "history.csv").read_text() == before

    # With --overwrite: a new run, its own history only.
    train_classifier.main(argv[:-4] + ["--epochs", "2", "--overwrite"])
    epochs, _ = _epochs(out)
    assert epochs == [0, 1]


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--epochs", "3", "--verbose", "0"]
    original = keras.callbacks.CSVLogger.on_epoch_end

    def on_epoch_end(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(keras.callbacks.CSVLogger, "on_epoch_end", on_epoch_end)
    with pytest.raises(SystemExit) as info:
        train_classifier.main(argv)
    assert info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    # Epoch 2's row is written, its backup not yet.
    assert err == [
        "Interrupted (1 epoch(s) saved); run the same command to resume."
    ]


def test_train_gan_end_to_end_and_resume(tmp_path, monkeypatch):
    out = tmp_path / "gan"
    argv = [
        "--output-dir",
        str(out),
        "--epochs",
        "3",
        "--verbose",
        "0",
        "--grid-every",
        "1",
    ]
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, keras.callbacks.TerminateOnNaN, 1)
        with pytest.raises(Interrupted):
            train_gan.main(argv)
    history = train_gan.main(argv)
    assert len(history["d_loss"]) == 3  # epochs 1-2, then 3 after resuming
    for name in ("gan.keras", "generator.keras", "curves.png"):
        assert (out / name).stat().st_size > 0, name
    grids = sorted(p.name for p in (out / "grids").iterdir())
    # Epoch 2's grid was written before its backup, and the kill.
    assert grids == [f"samples_epoch_{e:03d}.png" for e in (1, 2, 3)]
    gan = keras.models.load_model(out / "gan.keras", safe_mode=True)
    assert isinstance(gan, fitcustom.TapeGAN)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 3
    assert summary["last_grid"].endswith("samples_epoch_003.png")
    text = "\n".join(summary_script.lines(str(tmp_path)))
    assert "GAN          3 epochs" in text
    assert "Classifier   not run yet" in text


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (train_classifier, ["--epochs", "-1"], "--epochs must be >= 1"),
        (train_classifier, ["--batch-size", "0"], "--batch-size must be >= 1"),
        (train_classifier, ["--epochs", "two"], "--epochs must be an integer"),
        (train_classifier, ["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (train_gan, ["--loss", "wgan"], "--loss must be one of"),
        (
            train_classifier,
            ["--validation-fraction", "1"],
            "--validation-fraction must be between 0 and 1",
        ),
        (train_gan, ["--epochs", "0"], "--epochs must be >= 1"),
    ],
)
def test_bad_command_line_exits_with_one_line(
    tmp_path, capsys, script, argv, message
):
    with pytest.raises(SystemExit) as info:
        script.main(["--output-dir", str(tmp_path)] + argv)
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("script", [train_classifier, train_gan])
def test_unwritable_output_dir_exits_cleanly(tmp_path, script):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write to --output-dir"):
        script.main(["--output-dir", str(blocker / "out")])


def test_offline_dataset_error_is_one_line(tmp_path, monkeypatch):
    from fitcustom import datasets

    def offline():
        raise OSError("MNIST is not in the Keras cache (expected x/mnist.npz)")

    monkeypatch.setitem(datasets.DATASETS, "mnist", offline)
    with pytest.raises(SystemExit, match="error: MNIST is not in the Keras"):
        train_classifier.main(
            ["--output-dir", str(tmp_path), "--dataset", "mnist"]
        )


def test_gan_loss_names_match_the_library():
    from fitcustom import gan_losses

    assert sorted(train_gan.LOSS_NAMES) == sorted(gan_losses.LOSSES)


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        train_gan.main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 60)" in text and "least_squares" in text


# TensorFlow's C++ log lines: "I0000 00:00:17... cpu_feature_guard.cc:..."
# and the like, or oneDNN's notice.
TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} |oneDNN|cpu_feature_guard|absl::")
# TensorFlow 2.21's own defect, an error line it prints once where oneDNN
# is on (its graph optimizer tries to fuse a Conv2D, its bias and the
# LeakyReLU whose gradient still reads the bias's output, and gives up:
# the graph runs unfused, the numbers are the same). The README says so.
KNOWN_TF_DEFECT = re.compile(
    r"meta_optimizer\.cc:\d+\] remapper failed: INVALID_ARGUMENT: "
    r"Mutation::Apply error: fanout '\S*LeakyReluGrad' exist for missing node"
)

LOADING = (
    "a line of the program's own\n"
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR\n"
    "I0000 00:00:1796281151.609842   24137 port.cc:153] oneDNN custom "
    "operations are on.\n"
    "I0000 00:00:1796281151.644309   24137 cpu_feature_guard.cc:227] This "
    "TensorFlow binary is optimized\n"
    "To enable the following instructions: AVX2 AVX512F, rebuild\n"
    "W0000 00:00:1796281151.7   24137 some.cc:1] a warning\n"
    "E0000 00:00:1796281151.8   24137 other.cc:2] an error\n"
)
LINES = LOADING.splitlines()


@pytest.mark.parametrize(
    "level, kept",
    [
        (0, LINES),
        (1, LINES[:1] + LINES[5:]),
        (2, LINES[:1] + LINES[6:]),
        (3, LINES[:1]),
    ],
)
def test_what_tensorflow_prints_while_loading_follows_the_log_level(
    level, kept
):
    # Level 1 drops the info lines (with their second line) and abseil's
    # banner; level 2 also warnings, 3 errors; other text stays (a line
    # after a log line is the rest of its message).
    # Level 0 is the control: the same text passes whole.
    assert _common.kept_while_loading(LOADING, level).splitlines() == kept


@pytest.mark.slow
def test_a_normal_run_prints_no_tensorflow_log_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    run = subprocess.run(
        [sys.executable, "-m", "scripts.train_gan", "--output-dir"]
        + [str(tmp_path), "--epochs", "1", "--verbose", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    noise = [line for line in lines if TF_LOG_LINE.search(line)]
    assert [line for line in noise if not KNOWN_TF_DEFECT.search(line)] == []


@pytest.mark.slow
def test_cnn_beats_the_mlp_on_the_digits(tmp_path):
    """The script's defaults (30 epochs at most, the best validation epoch
    kept): measured test accuracy MLP 0.9644, CNN 0.9756."""
    accuracy = {}
    for model in ("mlp", "cnn"):
        argv = ["--output-dir", str(tmp_path / model), "--model", model]
        results = train_classifier.main(argv + ["--verbose", "0"])
        accuracy[model] = results["accuracy"]
    assert accuracy["mlp"] > 0.95, accuracy
    assert accuracy["cnn"] > accuracy["mlp"] + 0.005, accuracy


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bogus"], "unknown part or option 'bogus'"),
        (["--overwrite", "--epochs", "3"], "after --overwrite nothing else"),
    ],
)
def test_run_sh_refuses_bad_arguments_in_one_line(argv, message):
    """Checked before the environment is set up: nothing installed."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        ["bash", os.path.join(root, "scripts", "run.sh"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1 and message in run.stderr
