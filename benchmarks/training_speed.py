"""Training speed: fit() with fitcustom vs built-in fit() vs hand loops.

Method: the same work for every variant (architecture,
initial weights, in-memory data, batches, steps, `jit_compile`); warm-up
(trace and compile) timed apart; interleaved rounds; per-round paired
ratios to the reference (built-in `fit()`; for the GAN the hand-written
`tf.function` loop) with median and min-max; the reference timed twice per
round gives the noise band, and a variant inside it is "within noise".
In each round a variant runs `--repeats` times back to back and the round
keeps the fastest run: on a shared machine the slower runs measure
interference (here: stalls of ~0.6 s with both cores idle, seen in
/proc/stat, and CPU time per run varying by 40 %; the largest stalls were
tf.data's autotuner, now off, see `workloads.pipeline_options`), not the
code; Python's
`timeit` documentation gives the same advice, and `timeit`'s habit of
keeping the garbage collector off during a timed run is followed. The
order of the variants rotates from round to round, so that no variant
always runs in the same place (after the eager loop, say). Every variant
is built `--instances` times (fresh networks from the same initial
weights) and round `r` times instance `r mod N`: identical code measured
here 3-5 % apart from one instance to the next, consistently over rounds
(a built-in `fit()` against a second built-in `fit()`: 1.048), so a ratio
of two single instances carries that difference. The process's
CPU time per run is reported beside the wall time as a second measure.
Every variant is scored on a fixed evaluation set before and after
training, outside the timed runs.

Usage:
    python -m benchmarks.training_speed --quick --output-dir outputs/bench
    python -m benchmarks.training_speed --output-dir benchmarks/results
"""

import argparse
import gc
import os
import platform
import resource
import sys
import time
from datetime import UTC
from datetime import datetime

PROFILES = {
    "tiny": dict(
        workloads=["multi_io", "dcgan"],
        steps=8,
        rounds=2,
        repeats=1,
        instances=1,
        batch=16,
        eager_factor=0.5,
    ),
    # A first look on 2 CPU cores, one workload of each kind: one network,
    # dict inputs and outputs, two networks (all five took 5.5 min; the
    # CNNs need more steps than 20 to learn, so that their held-out
    # accuracy said nothing here).
    "quick": dict(
        workloads=["mlp", "multi_io", "dcgan"],
        steps=20,
        rounds=5,
        repeats=1,
        instances=1,
        batch=64,
        eager_factor=0.2,
    ),
    "full": dict(
        workloads=["mlp", "vgg_cnn", "cifar_cnn", "multi_io", "dcgan"],
        steps=100,
        rounds=12,
        repeats=2,
        instances=3,
        batch=64,
        eager_factor=0.1,
    ),
}
WORKLOAD_NAMES = ("mlp", "vgg_cnn", "cifar_cnn", "multi_io", "dcgan")
DATA_KINDS = ("synthetic", "digits", "keras")
MIN_ROUNDS = 5  # fewer cannot give a median with a spread


def _positive(parser, name, value, minimum):
    if value is not None and value < minimum:
        parser.error(f"{name} must be >= {minimum}, got {value}")


def parse_args(argv):
    """Parses and validates the command line into a settings dict."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.training_speed",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--output-dir", required=True, help="reports go here")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick",
        action="store_true",
        help="a first look: 3 workloads, 5 rounds (about 3 minutes on 2 "
        "CPU cores)",
    )
    group.add_argument(
        "--tiny", action="store_true", help="seconds; for the smoke test"
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="NAME",
        help=f"any of {', '.join(WORKLOAD_NAMES)} (spaces or commas)",
    )
    parser.add_argument("--steps", type=int, help="training steps per run")
    parser.add_argument("--rounds", type=int, help="interleaved rounds")
    parser.add_argument(
        "--repeats",
        type=int,
        help="back-to-back runs of a variant per round; the round keeps "
        "the fastest",
    )
    parser.add_argument(
        "--instances",
        type=int,
        help="fresh builds of each variant; round r times instance r mod N",
    )
    parser.add_argument("--batch-size", type=int, help="batch size")
    parser.add_argument(
        "--jit-compile",
        type=int,
        choices=(0, 1),
        default=0,
        help="XLA for every compiled variant (default 0)",
    )
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=50,
        metavar="N",
        help="for the *_speN fit() variants (default 50; 1 drops them)",
    )
    parser.add_argument(
        "--data",
        choices=DATA_KINDS,
        default="synthetic",
        help="synthetic (default), digits (real, offline) or keras "
        "(MNIST / CIFAR-10 from Keras' cache)",
    )
    parser.add_argument(
        "--class-id-check-cost",
        action="store_true",
        help="also run fitcustom's fit() variants without the in-step "
        "class-id check and report what the check costs (classifier "
        "workloads)",
    )
    parser.add_argument(
        "--check-claims",
        action="store_true",
        help="exit with status 1 if a speed target is missed",
    )
    args = parser.parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = dict(PROFILES[profile])
    if args.workloads:
        names = [n for w in args.workloads for n in w.split(",") if n]
        unknown = sorted(set(names) - set(WORKLOAD_NAMES))
        if unknown:
            parser.error(
                f"unknown workload(s) {', '.join(unknown)}; choose from "
                f"{', '.join(WORKLOAD_NAMES)}"
            )
        settings["workloads"] = list(dict.fromkeys(names))
    _positive(parser, "--steps", args.steps, 2)
    _positive(parser, "--rounds", args.rounds, 2)
    _positive(parser, "--repeats", args.repeats, 1)
    _positive(parser, "--instances", args.instances, 1)
    _positive(parser, "--batch-size", args.batch_size, 1)
    _positive(parser, "--steps-per-execution", args.steps_per_execution, 1)
    for key, value in (
        ("steps", args.steps),
        ("rounds", args.rounds),
        ("repeats", args.repeats),
        ("instances", args.instances),
        ("batch", args.batch_size),
    ):
        if value is not None:
            settings[key] = value
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        probe = os.path.join(args.output_dir, ".write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        parser.error(f"cannot write to --output-dir {args.output_dir}: {e}")
    settings.update(
        profile=profile,
        jit_compile=bool(args.jit_compile),
        spe=args.steps_per_execution,
        data=args.data,
        check_claims=args.check_claims,
        check_cost=args.class_id_check_cost,
        output_dir=args.output_dir,
    )
    return settings


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_memory_mib():
    """Total memory of each NVIDIA GPU in MiB, from `nvidia-smi` (TensorFlow
    reports only what it uses), or `[]` where `nvidia-smi` does not
    answer."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        return [float(line) for line in out.split() if line.strip()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def machine_info():
    """Device, versions and core count, for the report."""
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    info = {
        "device": f"CPU: {_cpu_name()}",
        "gpus": len(gpus),
        "gpu_names": [],
        "gpu_memory_mib": [],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for gpu in gpus:
        details = tf.config.experimental.get_device_details(gpu)
        info["gpu_names"].append(details.get("device_name", gpu.name))
    if gpus:
        info["device"] = f"GPU: {info['gpu_names'][0]}"
        info["gpu_memory_mib"] = _gpu_memory_mib()
    return info


class _DeviceMemory:
    """Peak device memory per variant on a GPU (nothing on a CPU)."""

    def __init__(self, gpus):
        self.device = "GPU:0" if gpus else None

    def reset(self):
        if self.device:
            import tensorflow as tf

            tf.config.experimental.reset_memory_stats(self.device)

    def peak_mib(self):
        if not self.device:
            return None
        import tensorflow as tf

        info = tf.config.experimental.get_memory_info(self.device)
        return info["peak"] / 2**20


def rotated(variants, round_index):
    """Round `r` runs the variants starting at position `r` (cyclically),
    so that a variant's place in the round changes from round to round and
    a drift within rounds (the variant after the eager loop pays for its
    garbage and caches, say) does not always favour the same one."""
    k = round_index % len(variants)
    return variants[k:] + variants[:k]


def _timed(fn):
    """`(wall seconds, CPU seconds of this process)` of one call of `fn`.

    The garbage collector is run before and kept off during the call, as
    Python's `timeit` does, so that no variant pays for another's garbage.
    """
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        cpu = time.process_time()
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
    finally:
        if enabled:
            gc.enable()
    return wall, cpu


def _max(a, b):
    return b if a is None else a if b is None else max(a, b)


def run_workload(workload, settings, progress, memory):
    """Warm-up, interleaved rounds, scoring and statistics of one workload.

    Returns:
        The workload's part of the results (see `FIELDS` in the tests).
    """
    import keras

    from benchmarks import stats
    from benchmarks import variants as variants_lib

    def make():
        if workload.is_gan:
            return variants_lib.gan_variants(
                settings["spe"], settings["eager_factor"]
            )
        return variants_lib.classifier_variants(
            settings["spe"],
            settings["eager_factor"],
            check_cost=settings.get("check_cost", False),
        )

    instances = settings.get("instances", 1)
    builds = [make() for _ in range(instances)]
    variants = builds[0]
    notes = []
    if workload.is_gan and variants_lib.TapeGAN is None:
        notes.append(
            "fitcustom.TapeGAN is not available: its variants were skipped."
        )
    keras.backend.clear_session()
    records = {}
    for build in builds:
        for v in build:
            v.setup(workload)
            initial = workload.evaluate(v.networks())
            memory.reset()
            start = time.perf_counter()
            v.run()
            warmup = time.perf_counter() - start
            rec = records.setdefault(
                v.name,
                {
                    "name": v.name,
                    "steps": v.steps,
                    "first_train_loss": v.train_loss(),
                    "initial_eval": initial,
                    "warmups_s": [],
                    "seconds": [],
                    "cpu_seconds": [],
                    "all_seconds": [],
                    "instance": [],
                    "device_peak_mib": None,
                },
            )
            rec["warmups_s"].append(warmup)
            rec["device_peak_mib"] = _max(
                rec["device_peak_mib"], memory.peak_mib()
            )
    for rec in records.values():
        # The first build of each variant: its first trace in this process.
        rec["warmup_s"] = rec["warmups_s"][0]
    progress.add(1)
    # Everything built so far (networks, traced graphs, Keras' and
    # TensorFlow's own objects) lives until the workload ends: frozen, it is
    # left out of the collection before each timed run, which then scans
    # only the garbage of the runs (0.22 s per collection without this, a
    # third of a --quick run's time, measured on 2 CPU cores).
    gc.collect()
    gc.freeze()
    try:
        for round_index in range(settings["rounds"]):
            instance = round_index % instances
            for v in rotated(builds[instance], round_index):
                memory.reset()
                runs = [_timed(v.run) for _ in range(settings["repeats"])]
                wall, cpu = min(runs)
                rec = records[v.name]
                rec["seconds"].append(wall)
                rec["cpu_seconds"].append(cpu)
                rec["all_seconds"].append([r[0] for r in runs])
                rec["instance"].append(instance)
                rec["device_peak_mib"] = _max(
                    rec["device_peak_mib"], memory.peak_mib()
                )
            progress.add(1)
    finally:
        gc.unfreeze()

    def per_step(key):
        return {
            v.name: [t / v.steps for t in records[v.name][key]]
            for v in variants
        }

    step_times = per_step("seconds")
    cpu_step_times = per_step("cpu_seconds")
    reference = next(v.name for v in variants if v.reference)
    noise = stats.noise_band(
        step_times[reference], step_times[f"{reference}_repeat"]
    )
    floor = step_times["floor_while_loop"]
    out = []
    for v in variants:
        rec = records[v.name]
        per_step = stats.median(step_times[v.name])
        ratio = stats.paired_ratio(step_times[v.name], step_times[reference])
        rec.update(
            ratio=ratio,
            cpu_ratio=stats.paired_ratio(
                cpu_step_times[v.name], cpu_step_times[reference]
            ),
            ratio_to_floor=stats.paired_ratio(step_times[v.name], floor)[
                "median"
            ],
            step_ms=1e3 * per_step,
            sample_us=1e6 * per_step / workload.batch,
            final_train_loss=v.train_loss(),
            final_eval=workload.evaluate(v.networks()),
            rss_mib=_rss_mib(),
            peak_rss_mib=_peak_rss_mib(),
            verdict="reference" if v.reference else stats.verdict(ratio, noise),
        )
        out.append(rec)
    return {
        "name": workload.name,
        "instances": instances,
        "reference": reference,
        "batch": workload.batch,
        "steps": workload.steps,
        "data": workload.data_note,
        "noise": noise,
        "notes": notes,
        "variants": out,
        "check_costs": stats.check_costs(
            step_times, cpu_step_times, variants_lib.UNCHECKED
        ),
        "claims": stats.workload_claims(
            step_times,
            noise,
            settings["spe"],
            workload.is_gan,
            cpu_step_times=cpu_step_times,
        ),
    }


def main(argv=None):
    """Runs the benchmark; returns the results dict (also written to
    `--output-dir` as results.json, results.csv, results.md, ratios.png)."""
    settings = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from benchmarks import report
    from benchmarks.workloads import Workload

    machine = machine_info()
    try:
        # All data first: a missing dataset stops the run before any timing.
        workloads = [
            Workload(
                name,
                settings["steps"],
                settings["batch"],
                settings["jit_compile"],
                data=settings["data"],
            )
            for name in settings["workloads"]
        ]
    except (OSError, ImportError) as e:
        sys.exit(f"training_speed: error: --data {settings['data']}: {e}")
    warnings = []
    if settings["rounds"] < MIN_ROUNDS:
        warnings.append(
            f"Only {settings['rounds']} rounds (a measurement needs at "
            f"least {MIN_ROUNDS}): a smoke run, not a measurement."
        )
    memory = _DeviceMemory(machine["gpus"])
    progress = keras.utils.Progbar(
        len(workloads) * (settings["rounds"] + 1), unit_name="round"
    )
    started = time.perf_counter()
    results_workloads = [
        run_workload(w, settings, progress, memory) for w in workloads
    ]
    machine["peak_rss_mib"] = _peak_rss_mib()
    results = {
        "profile": settings["profile"],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.training_speed "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "rounds": settings["rounds"],
        "repeats": settings["repeats"],
        "instances": settings["instances"],
        "jit_compile": settings["jit_compile"],
        "steps_per_execution": settings["spe"],
        "data": settings["data"],
        "wall_s": time.perf_counter() - started,
        "machine": machine,
        "warnings": warnings,
        "workloads": results_workloads,
    }
    paths = report.write(results, settings["output_dir"])
    print()
    print(report.table(results))
    print(f"Reports: {', '.join(paths.values())}")
    if settings["check_claims"] and report.failed_claims(results):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
