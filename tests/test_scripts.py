"""Scripts: main(argv) end to end at tiny settings, resume, bad input."""

import keras
import pytest

import fitcustom
from scripts import train_classifier
from scripts import train_gan
from scripts._common import read_csv_history


class Interrupted(Exception):
    pass


def _interrupt_after_epoch(monkeypatch, callback_class, epoch_index):
    """Makes `callback_class` raise at the end of epoch `epoch_index`
    (after BackupAndRestore, which comes first, has saved)."""
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
    if model == "mlp":  # the CNN's BatchNorm needs more than 3 epochs
        assert results["accuracy"] > 0.3
    assert not (out / "backup").exists()  # removed after a finished run


def test_train_classifier_resumes_an_interrupted_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--output-dir", str(out), "--epochs", "4", "--verbose", "0"]
    with monkeypatch.context() as patch:
        _interrupt_after_epoch(patch, keras.callbacks.EarlyStopping, 1)
        with pytest.raises(Interrupted):
            train_classifier.main(argv)
    assert (out / "backup").exists()
    train_classifier.main(argv)
    epochs = [
        int(e) for e in read_csv_history(out / "history.csv").get("epoch", [])
    ] or None
    history = read_csv_history(out / "history.csv")
    # 2 epochs before the interruption + 2 after: no epoch run twice.
    assert len(history["loss"]) == 4, epochs


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
    # Epoch 2's grid callback never ran: the run died before it.
    assert grids == [f"samples_epoch_{e:03d}.png" for e in (1, 3)]
    gan = keras.models.load_model(out / "gan.keras", safe_mode=True)
    assert isinstance(gan, fitcustom.TapeGAN)


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (train_classifier, ["--epochs", "-1"], "--epochs must be >= 1"),
        (train_classifier, ["--batch-size", "0"], "--batch-size must be >= 1"),
        (train_classifier, ["--epochs", "two"], "--epochs must be an integer"),
        (train_classifier, ["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (train_gan, ["--loss", "wgan"], "--loss must be one of"),
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
