"""The example program `scripts/examples/diffusion.py`: it trains end to end
(`--smoke`), and its step, written with the engine's tools, trains on 2
replicas what it trains on one device and continues exactly after a save
and a load in a fresh process."""

import json

import keras
import numpy as np
import pytest
from task_harness import Task
from task_harness import check_backup_resume
from task_harness import check_continue_in_fresh_process

import fitcustom
from scripts.examples import diffusion as diffusion_example


def _diffusion_data():
    rng = np.random.default_rng(2)
    return rng.uniform(-1, 1, size=(64, 8, 8, 1)).astype("float32"), None


def _diffusion(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = diffusion_example.build_diffusion(width=16, depth=1, ema_decay=0.5)
    model.compile(optimizer=keras.optimizers.SGD(0.05), **compile_kwargs)
    return model


DIFFUSION_TASK = Task(
    build=_diffusion,
    data=_diffusion_data,
    fit_kwargs={"batch_size": 16, "shuffle": False},
)


def test_diffusion_program_runs_and_scores_its_samples(tmp_path):
    last = diffusion_example.main(
        [
            "--output-dir",
            str(tmp_path),
            "--smoke",
            "--verbose",
            "0",
            "--sampling-steps",
            "4",
        ]
    )
    for name in ("diffusion.keras", "history.csv", "curves.png", "samples.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # The loss is what the step minimised (never a silent 0.0).
    assert last["loss"] == last["noise_loss"] > 0.01
    assert np.isfinite([last["kid"], last["fid"]]).all()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["real_vs_real"]["fid"] < last["fid"]


def test_diffusion_on_two_replicas_trains_what_one_device_trains(
    two_replicas,
):
    x, _ = _diffusion_data()
    report = fitcustom.testing.check_replicas(
        _diffusion,
        x,
        strategy=two_replicas,
        batch_size=16,
        epochs=2,
        weight_tolerance=1e-6,
        shuffle=False,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_diffusion_ema_network_follows_and_generates():
    x, _ = _diffusion_data()
    model = _diffusion()
    model.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
    moved = [
        float(np.abs(e.numpy() - w.numpy()).max())
        for e, w in zip(model.ema_network.weights, model.network.weights)
    ]
    assert max(moved) > 0  # an average, not a copy
    a = model.generate(3, seed=1, steps=3)
    b = model.generate(3, seed=1, steps=3)
    assert a.shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(a, b)


def test_diffusion_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_example_diffusion", "DIFFUSION_TASK", tmp_path
    )
    assert result["steps"] == [8]


def test_diffusion_resumes_its_ema_network_exactly_after_an_interruption(
    tmp_path,
):
    # Interrupted after 3 of 4 batches; the backup holds 2.
    weights, logs, steps = check_backup_resume(
        DIFFUSION_TASK, tmp_path / "ours"
    )
    assert weights <= 1e-6 and logs <= 1e-5, (weights, logs)
    assert steps == ([8], [8])
    # Control: Keras' own callback trains the interrupted epoch's first
    # batches again.
    with pytest.warns(UserWarning, match="from its first batch"):
        weights, _, steps = check_backup_resume(
            DIFFUSION_TASK,
            tmp_path / "keras",
            callback=keras.callbacks.BackupAndRestore,
        )
    assert weights > 1e-4 and steps == ([10], [8]), (weights, steps)


def test_diffusion_under_mixed_precision_takes_float32_sized_updates():
    x, _ = _diffusion_data()
    report = fitcustom.testing.check_mixed_precision(
        _diffusion, x, batch_size=16, epochs=2, shuffle=False
    )
    report.assert_ok()
