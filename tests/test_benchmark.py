"""Smoke test of the speed benchmark at tiny sizes: structure, not speed."""

import json

import pytest

from benchmarks import training_speed

FIELDS = {
    "name",
    "steps",
    "ratio",
    "ratio_to_floor",
    "step_ms",
    "sample_us",
    "warmup_s",
    "first_loss",
    "final_loss",
    "rss_mib",
    "verdict",
    "seconds",
}


@pytest.mark.slow
def test_tiny_benchmark_report(tmp_path):
    results = training_speed.main(["--tiny", "--output-dir", str(tmp_path)])
    for name in ("results.json", "results.csv", "results.md", "ratios.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert results["machine"]["device"]
    names = {w["name"]: w for w in results["workloads"]}
    assert set(names) == {"mlp", "dcgan"}
    expected = {
        "mlp": {
            "builtin_fit",
            "builtin_fit_repeat",
            "fitcustom_fit",
            "builtin_fit_spe50",
            "fitcustom_fit_spe50",
            "loop_tf_function",
            "loop_eager",
            "floor_while_loop",
        },
        "dcgan": {
            "loop_tf_function",
            "loop_tf_function_repeat",
            "fitcustom_fit",
            "fitcustom_fit_spe50",
            "loop_eager",
            "floor_while_loop",
        },
    }
    for name, workload in names.items():
        variants = {v["name"]: v for v in workload["variants"]}
        assert set(variants) == expected[name]
        for v in variants.values():
            assert FIELDS <= set(v), v["name"]
            assert len(v["seconds"]) == results["rounds"]
            assert v["verdict"] in {
                "reference",
                "faster",
                "slower",
                "within noise",
            }
            # Every variant trained: its loss moved (and for the
            # classifier went down) between the warm-up and the last run.
            assert v["final_loss"] != v["first_loss"], v["name"]
            if name == "mlp":
                assert v["final_loss"] < v["first_loss"], v["name"]
        reference = variants[workload["reference"]]
        assert reference["ratio"]["median"] == 1.0
    # Same work: the compiled fit and loop variants of the classifier end
    # with the same loss (same weights, data, batches, steps).
    mlp = {v["name"]: v["final_loss"] for v in names["mlp"]["variants"]}
    for variant in (
        "fitcustom_fit",
        "loop_tf_function",
        "floor_while_loop",
        "fitcustom_fit_spe50",
    ):
        assert mlp[variant] == pytest.approx(mlp["builtin_fit"], rel=1e-5)
    markdown = (tmp_path / "results.md").read_text()
    assert "| fitcustom_fit |" in markdown


def test_bad_command_line(capsys, tmp_path):
    with pytest.raises(SystemExit):
        training_speed.main(["--output-dir", str(tmp_path), "--rounds", "1"])
    assert "--rounds must be >= 2" in capsys.readouterr().err
