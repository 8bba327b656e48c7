"""Training speed: fit() with fitcustom vs built-in fit() vs hand loops.

Method (../shared/BENCHMARK.md): the same work for every variant; warm-up
(tracing) timed apart; interleaved rounds; per-round ratios to the
reference (built-in `fit()`, or for the GAN the hand-written `tf.function`
loop); median and min-max; the reference timed twice per round gives the
noise band, and a variant inside it is reported "within noise".

Usage:
    python -m benchmarks.training_speed --quick --output-dir outputs/bench
    python -m benchmarks.training_speed --output-dir benchmarks/results
"""

import argparse
import os
import platform
import resource
import sys
import time

PROFILES = {
    "tiny": dict(
        workloads=["mlp", "dcgan"],
        steps=8,
        rounds=2,
        batch=16,
        eager_factor=0.5,
    ),
    "quick": dict(
        workloads=["mlp", "vgg_cnn", "dcgan"],
        steps=40,
        rounds=5,
        batch=64,
        eager_factor=0.25,
    ),
    "full": dict(
        workloads=["mlp", "vgg_cnn", "cifar_cnn", "dcgan"],
        steps=200,
        rounds=7,
        batch=64,
        eager_factor=0.1,
    ),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick", action="store_true", help="about 3 minutes on 2 CPU cores"
    )
    group.add_argument(
        "--tiny", action="store_true", help="seconds; for the smoke test"
    )
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=["mlp", "vgg_cnn", "cifar_cnn", "dcgan"],
    )
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--jit-compile", type=int, choices=(0, 1), default=0)
    parser.add_argument("--steps-per-execution", type=int, default=50)
    args = parser.parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = dict(PROFILES[profile])
    for key in ("workloads", "steps", "rounds"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings["steps"] < 2:
        parser.error(f"--steps must be >= 2, got {settings['steps']}")
    if settings["rounds"] < 2:
        parser.error(f"--rounds must be >= 2, got {settings['rounds']}")
    if args.steps_per_execution < 1:
        parser.error(
            "--steps-per-execution must be >= 1, got "
            f"{args.steps_per_execution}"
        )
    settings.update(
        profile=profile,
        jit_compile=bool(args.jit_compile),
        spe=args.steps_per_execution,
        output_dir=args.output_dir,
    )
    return settings


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    import keras
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU: {details.get('device_name', gpus[0].name)}"
    else:
        device = f"CPU: {_cpu_name()}"
    return {
        "device": device,
        "gpus": len(gpus),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def _median(values):
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def run_workload(name, settings, progress):
    import keras

    from benchmarks.workloads import Workload

    workload = Workload(
        name, settings["steps"], settings["batch"], settings["jit_compile"]
    )
    variants = workload.variants(settings["spe"], settings["eager_factor"])
    warmup, first_loss = {}, {}
    for v in variants:
        keras.backend.clear_session(free_memory=False)
        v.setup(workload)
        start = time.perf_counter()
        v.run()
        warmup[v.name] = time.perf_counter() - start
        first_loss[v.name] = v.loss()
    times = {v.name: [] for v in variants}
    rss = {}
    for _ in range(settings["rounds"]):
        for v in variants:
            start = time.perf_counter()
            v.run()
            times[v.name].append(time.perf_counter() - start)
            rss[v.name] = _rss_mib()
        progress.add(1)
    reference = next(v for v in variants if v.reference)
    ref_times = times[reference.name]
    repeat = times[f"{reference.name}_repeat"]
    noise = max(0.01, max(abs(a / b - 1) for a, b in zip(repeat, ref_times)))
    floor = next(v for v in variants if v.name.startswith("floor"))
    out = []
    for v in variants:
        steps = max(1, int(workload.steps * v.steps_factor))
        # Per-step time; the eager loop runs fewer steps: compare per step.
        per_step = [t / steps for t in times[v.name]]
        ref_step = [t / workload.steps for t in ref_times]
        floor_step = [t / workload.steps for t in times[floor.name]]
        ratios = [a / b for a, b in zip(per_step, ref_step)]
        ratio = {
            "median": _median(ratios),
            "min": min(ratios),
            "max": max(ratios),
            "rounds": ratios,
        }
        if v.reference:
            verdict = "reference"
        elif ratio["max"] < 1 - noise:
            verdict = "faster"
        elif ratio["min"] > 1 + noise:
            verdict = "slower"
        else:
            verdict = "within noise"
        med = _median(per_step)
        out.append(
            {
                "name": v.name,
                "steps": steps,
                "ratio": ratio,
                "ratio_to_floor": med / _median(floor_step),
                "step_ms": 1e3 * med,
                "sample_us": 1e6 * med / workload.batch,
                "warmup_s": warmup[v.name],
                "first_loss": first_loss[v.name],
                "final_loss": v.loss(),
                "rss_mib": rss[v.name],
                "verdict": verdict,
                "seconds": times[v.name],
            }
        )
    return {
        "name": name,
        "reference": reference.name,
        "batch": workload.batch,
        "steps": workload.steps,
        "noise": noise,
        "variants": out,
    }


def main(argv=None):
    settings = parse_args(argv)
    try:
        os.makedirs(settings["output_dir"], exist_ok=True)
    except OSError as e:
        sys.exit(f"error: cannot write to --output-dir: {e}")
    import keras

    from benchmarks import report

    total = settings["rounds"] * len(settings["workloads"])
    progress = keras.utils.Progbar(total, unit_name="round")
    workloads = [
        run_workload(name, settings, progress) for name in settings["workloads"]
    ]
    machine = machine_info()
    machine["peak_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    if machine["gpus"]:
        import tensorflow as tf

        machine["gpu_peak_mib"] = (
            tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
        )
    results = {
        "profile": settings["profile"],
        "rounds": settings["rounds"],
        "jit_compile": settings["jit_compile"],
        "steps_per_execution": settings["spe"],
        "machine": machine,
        "workloads": workloads,
    }
    paths = report.write(results, settings["output_dir"])
    print()
    print(report.table(results))
    print(f"Reports: {', '.join(paths.values())}")
    return results


if __name__ == "__main__":
    main()
