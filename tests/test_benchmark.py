"""Smoke test of the speed benchmark at tiny sizes: structure, not speed."""

import csv
import json

import pytest

from benchmarks import stats
from benchmarks import training_speed

VARIANT_FIELDS = {
    "name",
    "steps",
    "ratio",
    "ratio_to_floor",
    "step_ms",
    "sample_us",
    "warmup_s",
    "first_train_loss",
    "final_train_loss",
    "initial_eval",
    "final_eval",
    "rss_mib",
    "peak_rss_mib",
    "device_peak_mib",
    "verdict",
    "seconds",
    "cpu_seconds",
    "cpu_ratio",
}
EXPECTED = {
    "multi_io": {
        "builtin_fit",
        "builtin_fit_repeat",
        "fitcustom_fit",
        "builtin_fit_spe4",
        "fitcustom_fit_spe4",
        "loop_tf_function",
        "loop_eager",
        "floor_while_loop",
    },
    "dcgan": {
        "loop_tf_function",
        "loop_tf_function_repeat",
        "builtin_fit",
        "builtin_fit_spe4",
        "fitcustom_fit",
        "fitcustom_fit_spe4",
        "loop_eager",
        "floor_while_loop",
    },
}


#: Builds of every variant: one each here (a second build costs 25-50 s);
#: `test_builds_take_turns_round_by_round` covers several.
INSTANCES = {"multi_io": 1, "dcgan": 1}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    runs = {}
    for workload, instances in INSTANCES.items():
        out = tmp_path_factory.mktemp(workload)
        argv = ["--tiny", "--steps-per-execution", "4", "--workloads"]
        argv += [workload, "--instances", str(instances)]
        argv += ["--output-dir", str(out)]
        runs[workload] = training_speed.main(argv), out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INSTANCES))
def test_reports_written(tiny_runs, name):
    results, out = tiny_runs[name]
    for file in ("results.json", "results.csv", "results.md", "ratios.png"):
        assert (out / file).stat().st_size > 0, file
    assert json.loads((out / "results.json").read_text()) == results
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(EXPECTED[name])
    markdown = (out / "results.md").read_text()
    for text in ("| fitcustom_fit |", "Speed claims", "noise band"):
        assert text in markdown
    assert "Every variant is built" not in markdown  # one build


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INSTANCES))
def test_every_variant_measured_and_trained(tiny_runs, name):
    results, _ = tiny_runs[name]
    instances = INSTANCES[name]
    assert results["machine"]["device"]
    assert results["warnings"]  # 2 rounds: flagged as a smoke run
    assert [w["name"] for w in results["workloads"]] == [name]
    workload = results["workloads"][0]
    variants = {v["name"]: v for v in workload["variants"]}
    assert set(variants) == EXPECTED[name]
    assert workload["noise"] >= stats.MIN_NOISE
    reference = variants[workload["reference"]]
    assert reference["ratio"]["median"] == 1.0
    assert reference["verdict"] == "reference"
    initial = {v["initial_eval"]["loss"] for v in variants.values()}
    assert max(initial) - min(initial) < 1e-5, "same initial weights"
    for v in variants.values():
        assert VARIANT_FIELDS <= set(v), v["name"]
        assert len(v["seconds"]) == results["rounds"]
        assert all(t > 0 for t in v["seconds"])
        # Each round keeps the fastest of its back-to-back runs.
        repeats = [results["repeats"]] * results["rounds"]
        assert [len(r) for r in v["all_seconds"]] == repeats
        assert v["seconds"] == [min(r) for r in v["all_seconds"]]
        assert len(v["cpu_seconds"]) == results["rounds"]
        assert all(t > 0 for t in v["cpu_seconds"])
        assert v["warmup_s"] > 0
        # Every build of a variant warmed up; the builds take turns.
        assert workload["instances"] == results["instances"] == instances
        assert len(v["warmups_s"]) == instances
        assert v["warmup_s"] == v["warmups_s"][0]
        turns = [r % instances for r in range(results["rounds"])]
        assert v["instance"] == turns
        assert v["verdict"] in {"reference", "faster", "slower", "within noise"}
        # Every variant trained: the held-out loss went down (for the
        # GAN, the discriminator's on fixed real and generated images).
        assert v["final_eval"]["loss"] < v["initial_eval"]["loss"], v["name"]
    claims = [c["claim"] for c in workload["claims"]]
    if name == "dcgan":
        assert claims == [
            "fitcustom_fit / loop_tf_function <= 1.02",
            "fitcustom_fit / builtin_fit <= 1.02",
            "fitcustom_fit_spe4 / loop_tf_function <= 1.00",
        ]
    else:
        assert claims == [
            "fitcustom_fit / builtin_fit <= 1.02",
            "fitcustom_fit_spe4 / loop_tf_function <= 1.00",
        ]
    for c in workload["claims"]:
        assert len(c["cpu_ratio"]["rounds"]) == results["rounds"]


@pytest.mark.slow
@pytest.mark.parametrize("workload", ["multi_io", "dcgan"])
def test_compiled_variants_do_the_same_work(tiny_runs, workload):
    # Same weights, data, batches, steps (and, for the GAN, the same latent
    # noise): the compiled variants end with the same training loss and the
    # same held-out numbers as the reference.
    results, _ = tiny_runs[workload]
    found = {w["name"]: w for w in results["workloads"]}[workload]
    variants = {v["name"]: v for v in found["variants"]}
    base = variants[found["reference"]]
    others = [
        "fitcustom_fit",
        "fitcustom_fit_spe4",
        "builtin_fit_spe4",
        "floor_while_loop",
        "loop_tf_function" if workload != "dcgan" else "builtin_fit",
    ]
    for name in others:
        assert variants[name]["final_train_loss"] == pytest.approx(
            base["final_train_loss"], rel=1e-4
        ), name
        for key, value in base["final_eval"].items():
            assert variants[name]["final_eval"][key] == pytest.approx(
                value, rel=1e-4
            ), (name, key)


@pytest.mark.slow
def test_gpu_memory_reported_where_there_is_a_gpu(tiny_runs):
    """On a GPU the machine line gives the GPU's name and memory and the
    tables a peak device memory column; on a CPU neither appears."""
    import copy

    from benchmarks import report

    results, _ = tiny_runs["multi_io"]
    assert not results["machine"]["gpus"]
    assert "peak device MiB" not in report.markdown(results)
    assert "dev MiB" not in report.table(results)
    gpu = copy.deepcopy(results)
    gpu["machine"].update(
        gpus=1,
        gpu_names=["NVIDIA T4"],
        gpu_memory_mib=[15360.0],
        device="GPU: NVIDIA T4",
    )
    for w in gpu["workloads"]:
        for i, v in enumerate(w["variants"]):
            v["device_peak_mib"] = 100.0 + i
    markdown = report.markdown(gpu)
    cores = results["machine"]["cpu_count"]
    assert (
        f"Device: GPU: NVIDIA T4 ({cores} CPU cores, 1 GPU(s) of 15360 MiB)"
        in markdown
    )
    header = next(
        line for line in markdown.splitlines() if "peak device MiB" in line
    )
    rows = [line for line in markdown.splitlines() if "| 101 |" in line]
    assert len(rows) == len(gpu["workloads"])
    n_columns = header.count("|")
    assert all(row.count("|") == n_columns for row in rows)
    assert " 101 " in report.table(gpu).split("dev MiB")[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "1"], "--rounds must be >= 2"),
        (["--steps", "0"], "--steps must be >= 2"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--steps-per-execution", "0"], "--steps-per-execution must be"),
        (["--workloads", "mlp,resnet"], "unknown workload"),
        (["--jit-compile", "2"], "invalid choice"),
        (["--quick", "--tiny"], "not allowed with"),
    ],
    ids=["rounds", "steps", "repeats", "spe", "workload", "jit", "profiles"],
)
def test_bad_command_line(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as info:
        training_speed.main(["--output-dir", str(tmp_path), *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        training_speed.main(["--output-dir", str(blocker / "sub")])
    assert "cannot write to --output-dir" in capsys.readouterr().err


def test_claim_status():
    fast, slow = [1.0, 1.0, 1.0], [1.1, 1.1, 1.1]
    assert stats.claim("c", fast, fast, 1.02, 0.05, "")["status"] == "holds"
    held = stats.claim("c", slow, fast, 1.02, 0.1, "")
    assert held["status"] == "fails within noise"
    assert not held["resolved"]
    assert stats.claim("c", slow, fast, 1.0, 0.01, "")["status"] == "fails"


def test_rounds_rotate_the_order():
    variants = ["a", "b", "c", "d"]
    orders = [training_speed.rotated(variants, r) for r in range(6)]
    assert all(sorted(o) == variants for o in orders)
    assert [o[0] for o in orders] == ["a", "b", "c", "d", "a", "b"]
    assert orders[1] == ["b", "c", "d", "a"]


def test_reference_repeat_half_a_round_away():
    from benchmarks import variants

    names = [v.name for v in variants.classifier_variants(50, 0.1)]
    assert names[0] == "builtin_fit"
    assert names.index("builtin_fit_repeat") == len(names) // 2
    names = [v.name for v in variants.gan_variants(50, 0.1)]
    assert names[0] == "loop_tf_function"
    assert names.index("loop_tf_function_repeat") == len(names) // 2


def test_claim_reports_cpu_ratio():
    wall, ref = [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]
    cpu = ([2.0, 2.2, 2.1], [2.0, 2.0, 2.0])
    result = stats.claim("c", wall, ref, 1.02, 0.05, "", cpu=cpu)
    assert result["status"] == "holds"  # decided by wall time
    assert result["cpu_ratio"]["median"] == pytest.approx(1.05)
    assert stats.claim("c", wall, ref, 1.02, 0.05, "")["cpu_ratio"] is None


@pytest.mark.parametrize("name", ["mlp", "multi_io", "dcgan"])
def test_input_pipeline_runs_without_autotuning(name):
    """The shared pipeline turns tf.data's autotuner off (its wake-ups
    stalled iterator deletion at random, see `pipeline_options`), and the
    variants that iterate it keep the option."""
    from benchmarks import variants
    from benchmarks import workloads

    w = workloads.Workload(name, steps=2, batch=4, jit_compile=False)
    assert w.dataset.options().autotune.enabled is False
    make = variants.gan_variants if w.is_gan else variants.classifier_variants
    for v in make(2, 0.5):
        v.setup(w)
        if hasattr(v, "dataset"):
            assert v.dataset.options().autotune.enabled is False, v.name


@pytest.mark.parametrize(
    "script, expected",
    [
        ("echo 15360; echo 16384", [15360.0, 16384.0]),
        ("echo 'NVIDIA-SMI has failed' >&2; exit 9", []),
        ("echo '[N/A]'", []),
    ],
    ids=["two-gpus", "driver-fails", "not-a-number"],
)
def test_gpu_memory_from_nvidia_smi(tmp_path, monkeypatch, script, expected):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert training_speed._gpu_memory_mib() == expected


def test_gpu_memory_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert training_speed._gpu_memory_mib() == []


def test_failed_claims_lists_every_claim_that_does_not_hold():
    from benchmarks import report

    def claim(name, status):
        return {"claim": name, "status": status}

    results = {
        "workloads": [
            {"claims": [claim("a", "holds"), claim("b", "fails")]},
            {"claims": [claim("c", "fails within noise")]},
            {"claims": [claim("d", "holds")]},
        ]
    }
    failed = [c["claim"] for c in report.failed_claims(results)]
    assert failed == ["b", "c"]


def test_general_paths_measures_paired_rounds():
    from benchmarks import general_paths

    times = general_paths.measure("generator", rounds=2, steps=10)
    assert set(times) == {"builtin_fit", "builtin_fit_repeat", "fitcustom_fit"}
    assert all(len(v) == 2 and min(v) > 0 for v in times.values())


def test_class_id_check_cost_pairs_each_variant_with_its_unchecked_twin():
    times = {"a": [2.0, 3.0, 2.0], "a_unchecked": [1.0, 2.0, 2.0], "b": [1.0]}
    cpu = {k: [2 * t for t in v] for k, v in times.items()}
    (cost,) = stats.check_costs(times, cpu, "_unchecked")
    assert cost["variant"] == "a"
    assert cost["ratio"]["median"] == pytest.approx(1.5)
    assert cost["ratio"]["max"] == pytest.approx(2.0)
    assert cost["cpu_ratio"]["median"] == pytest.approx(1.5)
    assert stats.check_costs({"a": [1.0]}, {"a": [1.0]}, "_unchecked") == []
    from benchmarks import report

    assert report.plain_name(
        "fitcustom_fit_spe50_unchecked", "builtin_fit"
    ) == ("fit() with fitcustom, 50 steps per call, no class-id check")


def test_unchecked_variant_differs_only_by_the_class_id_check():
    """`--class-id-check-cost`'s variants: the same training without the
    check (same loss), and only the checked one stops a step on a class
    id out of range."""
    import numpy as np
    import tensorflow as tf

    from benchmarks import variants
    from benchmarks import workloads

    w = workloads.Workload("mlp", steps=2, batch=4, jit_compile=False)
    made = {v.name: v for v in variants.classifier_variants(2, 0.5, True)}
    assert {"fitcustom_fit_unchecked", "fitcustom_fit_spe2_unchecked"} <= set(
        made
    )
    losses = {}
    for name in ("fitcustom_fit", "fitcustom_fit_unchecked"):
        made[name].setup(w)
        made[name].run()
        losses[name] = made[name].train_loss()
    assert losses["fitcustom_fit"] == pytest.approx(
        losses["fitcustom_fit_unchecked"], rel=1e-6
    )
    y_pred = tf.zeros((2, 10))
    bad = tf.constant([3, 12])
    grads = [tf.ones(3)]
    unchecked = made["fitcustom_fit_unchecked"].model
    assert unchecked.check_class_ids(bad, y_pred, grads) is grads
    with pytest.raises(tf.errors.InvalidArgumentError, match="12"):
        made["fitcustom_fit"].model.check_class_ids(bad, y_pred, grads)
    np.testing.assert_array_equal(
        made["fitcustom_fit"].model.check_class_ids(
            tf.constant([3, 9]), y_pred, grads
        )[0],
        grads[0],
    )


def test_builds_take_turns_round_by_round(monkeypatch):
    """`--instances N`: every variant is built N times, each build warms
    up, and round r times build r mod N (fake variants: no training)."""
    from benchmarks import variants

    built = []

    class Fake(variants.Variant):
        def __init__(self, name, reference=False):
            super().__init__(name)
            self.reference = reference
            built.append(self)
            self.runs = 0

        def run(self):
            self.runs += 1
            self._loss = 1.0 / self.runs

        def networks(self):
            return self

    def fakes(spe, eager_factor, check_cost=False):
        names = ["floor_while_loop", "fitcustom_fit", "builtin_fit_repeat"]
        return [Fake("builtin_fit", True)] + [Fake(n) for n in names]

    class Workload:
        name, is_gan, batch, steps, data_note = "fake", False, 4, 3, "none"

        def evaluate(self, networks):
            return {"loss": 1.0, "accuracy": 0.5}

    class Progress:
        def add(self, n):
            pass

    class Memory:
        def reset(self):
            pass

        def peak_mib(self):
            return None

    monkeypatch.setattr(variants, "classifier_variants", fakes)
    settings = dict(rounds=5, repeats=2, instances=3, spe=1, eager_factor=1)
    result = training_speed.run_workload(
        Workload(), settings, Progress(), Memory()
    )
    assert result["instances"] == 3 and len(built) == 12
    for v in result["variants"]:
        assert len(v["warmups_s"]) == 3
        assert v["instance"] == [0, 1, 2, 0, 1]
        assert [len(r) for r in v["all_seconds"]] == [2] * 5
    # Build i ran its warm-up plus 2 runs in each of its rounds.
    assert sorted(b.runs for b in built) == [3] * 4 + [5] * 8
