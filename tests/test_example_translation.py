"""The example program `scripts/examples/translation.py`: it trains end to end
(`--smoke`), and its step, written with the engine's tools, trains on 2
replicas what it trains on one device and continues exactly after a save
and a load in a fresh process."""

import keras
import numpy as np
from task_harness import Task
from task_harness import check_continue_in_fresh_process

import fitcustom
from scripts.examples import translation as translation_example


def _translation_data():
    rng = np.random.default_rng(3)
    a = rng.uniform(-1, 1, size=(32, 8, 8, 1)).astype("float32")
    return a, translation_example.to_domain_b(a[::-1])


def _translation(**compile_kwargs):
    keras.utils.set_random_seed(0)
    model = translation_example.build_translation()
    model.compile(
        optimizer={
            name: keras.optimizers.SGD(0.02)
            for name in ("a_to_b", "b_to_a", "judge_a", "judge_b")
        },
        **compile_kwargs,
    )
    return model


TRANSLATION_TASK = Task(
    build=_translation,
    data=_translation_data,
    fit_kwargs={"batch_size": 8, "shuffle": False},
)


def test_translation_program_runs_and_writes_its_outputs(tmp_path):
    last = translation_example.main(
        ["--output-dir", str(tmp_path), "--smoke", "--verbose", "0"]
    )
    for name in (
        "translation.keras",
        "history.csv",
        "curves.png",
        "translations.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    terms = (
        "cycle",
        "fool_a",
        "fool_b",
        "identity_a",
        "identity_b",
        "judge_a_loss",
        "judge_b_loss",
    )
    # The cycle term, minimised by both generators, counts once.
    np.testing.assert_allclose(
        last["loss"], sum(last[t] for t in terms), rtol=1e-5
    )


def test_translation_four_optimizers_on_two_replicas(two_replicas):
    x, y = _translation_data()
    report = fitcustom.testing.check_replicas(
        _translation,
        x,
        y,
        strategy=two_replicas,
        batch_size=8,
        epochs=2,
        weight_tolerance=1e-6,
        shuffle=False,
    )
    assert report.weight_change > 1e-3, report
    report.assert_ok()


def test_translation_continues_after_loading_in_a_fresh_process(tmp_path):
    result = check_continue_in_fresh_process(
        "test_example_translation", "TRANSLATION_TASK", tmp_path
    )
    assert result["steps"] == [8, 8, 8, 8]


def test_translation_under_mixed_precision_takes_float32_sized_updates():
    a, b = _translation_data()
    report = fitcustom.testing.check_mixed_precision(
        _translation, a, b, batch_size=8, epochs=2, shuffle=False
    )
    report.assert_ok()
