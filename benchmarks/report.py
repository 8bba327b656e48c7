"""Benchmark report: terminal table, JSON, CSV, Markdown and a PNG chart."""

import csv
import json
import os


def _fmt_ratio(r):
    return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


def _fmt_eval(v):
    first, last = v["initial_eval"], v["final_eval"]
    return f"{first['loss']:.3f}→{last['loss']:.3f}", f"{last['accuracy']:.3f}"


def _fmt_cpu(item):
    ratio = item.get("cpu_ratio")
    return "n/a" if ratio is None else f"{ratio['median']:.3f}"


def failed_claims(results):
    """The claims whose status is not "holds"."""
    return [
        c
        for w in results["workloads"]
        for c in w["claims"]
        if c["status"] != "holds"
    ]


def rows(results):
    """Flat rows, one per workload and variant."""
    out = []
    for w in results["workloads"]:
        for v in w["variants"]:
            out.append(
                {
                    "workload": w["name"],
                    "reference": w["reference"],
                    "variant": v["name"],
                    "steps": v["steps"],
                    "ratio_median": v["ratio"]["median"],
                    "ratio_min": v["ratio"]["min"],
                    "ratio_max": v["ratio"]["max"],
                    "cpu_ratio_median": v["cpu_ratio"]["median"],
                    "ratio_to_floor": v["ratio_to_floor"],
                    "noise": w["noise"],
                    "step_ms": v["step_ms"],
                    "sample_us": v["sample_us"],
                    "warmup_s": v["warmup_s"],
                    "first_train_loss": v["first_train_loss"],
                    "final_train_loss": v["final_train_loss"],
                    "initial_eval_loss": v["initial_eval"]["loss"],
                    "final_eval_loss": v["final_eval"]["loss"],
                    "final_eval_accuracy": v["final_eval"]["accuracy"],
                    "rss_mib": v["rss_mib"],
                    "peak_rss_mib": v["peak_rss_mib"],
                    "device_peak_mib": v["device_peak_mib"],
                    "verdict": v["verdict"],
                }
            )
    return out


def _gpus_note(m):
    if not m["gpus"]:
        return ""
    memory = m.get("gpu_memory_mib") or []
    return f", {m['gpus']} GPU(s)" + (
        f" of {memory[0]:.0f} MiB" if memory else ""
    )


def _machine_line(results):
    m = results["machine"]
    line = (
        f"Device: {m['device']} ({m['cpu_count']} CPU cores"
        + _gpus_note(m)
        + f"); TensorFlow {m['tensorflow']}, Keras {m['keras']}, Python "
        f"{m['python']}; peak RSS {m['peak_rss_mib']:.0f} MiB."
    )
    return line


def _instances_note(instances):
    if instances == 1:
        return ""
    return (
        f"Every variant is built {instances} times (fresh networks from the "
        f"same initial weights) and round r times build r mod {instances}: "
        "identical code runs a few percent apart from one build to another, "
        "consistently, so a ratio of single builds would carry that. "
    )


def _method_note(results):
    return (
        f"{results['rounds']} interleaved rounds; in each, every variant "
        f"runs {results.get('repeats', 1)} time(s) back to back and the "
        "round keeps its fastest run (slower ones measure the machine's "
        "interference); the order of the variants rotates from round to "
        "round, and the garbage collector runs before each timed run and "
        "is off during it (as in `timeit`; what was built before the "
        "rounds is frozen out of it). "
        + _instances_note(results.get("instances", 1))
        + "jit_compile="
        f"{results['jit_compile']}, warm-up (first run: trace and compile) "
        "timed apart. Ratio = variant time per step / reference time per "
        "step in the same round, median [min-max]; below 1 is faster. CPU "
        "ratio: the same with the process's CPU time (user + system, all "
        "threads), a second measure that a stalled virtual machine does "
        "not inflate. The reference is timed twice per round (half a round "
        "apart): the largest "
        "relative difference of the two is the noise band, and a variant "
        'whose whole interval is not outside 1 ± noise is "within noise". '
        "Eval loss and accuracy: every variant scored on the same held-out "
        "set before and after training (for the DCGAN: the "
        "discriminator's loss and accuracy on fixed real and generated "
        "images). The eager loop runs fewer steps (per-step times). "
        "The input pipeline (in-memory slices, batched) runs with tf.data "
        "autotuning off: with it on, an iterator's deletion at the end of "
        "an epoch sometimes waits for the autotuner's next wake-up (up to "
        "2 s in a 3 s run), at random in every tf.data-fed variant."
    )


def _device_memory(workload):
    """Whether the workload's variants have a peak device memory (GPU)."""
    return any(
        v.get("device_peak_mib") is not None for v in workload["variants"]
    )


def _fmt_mib(value):
    return "n/a" if value is None else f"{value:.0f}"


def _md_row(cells):
    return "| " + " | ".join(cells) + " |"


def markdown(results):
    """The report as Markdown, pasteable into the README."""
    lines = [
        f"### Training speed ({results['profile']} profile, "
        f"{results['date'][:10]})",
        "",
        _machine_line(results),
        "",
        _method_note(results),
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    lines += [f"> {w}" for w in results["warnings"]]
    for w in results["workloads"]:
        lines += [
            f"**{w['name']}** (batch {w['batch']}, {w['steps']} steps, data: "
            f"{w['data']}; reference `{w['reference']}`; noise band "
            f"±{w['noise']:.3f})",
            "",
        ]
        lines += [f"> {n}" for n in w["notes"]]
        memory = _device_memory(w)
        columns = [
            "variant",
            "ratio to reference",
            "CPU ratio",
            "ratio to floor",
            "ms/step",
            "µs/sample",
            "warm-up s",
            *(["peak device MiB"] if memory else []),
            "train loss first→last",
            "eval loss before→after",
            "eval acc",
            "verdict",
        ]
        lines += [_md_row(columns), "|" + " --- |" * len(columns)]
        for v in w["variants"]:
            eval_loss, eval_acc = _fmt_eval(v)
            cells = [
                v["name"],
                _fmt_ratio(v["ratio"]),
                f"{v['cpu_ratio']['median']:.3f}",
                f"{v['ratio_to_floor']:.2f}",
                f"{v['step_ms']:.2f}",
                f"{v['sample_us']:.1f}",
                f"{v['warmup_s']:.2f}",
                *([_fmt_mib(v["device_peak_mib"])] if memory else []),
                f"{v['first_train_loss']:.3f}→{v['final_train_loss']:.3f}",
                eval_loss,
                eval_acc,
                v["verdict"],
            ]
            lines.append(_md_row(cells))
        lines.append("")
    costs = [
        (w, c) for w in results["workloads"] for c in w.get("check_costs", [])
    ]
    if costs:
        lines += [
            "**The in-step class-id check** (each variant against the same "
            "variant without the check, paired by round; above 1: the share "
            "of a step the check costs)",
            "",
            "| workload | variant | with / without check, median [min-max] "
            "| CPU ratio | noise |",
            "| --- | --- | --- | --- | --- |",
        ]
        for w, c in costs:
            lines.append(
                f"| {w['name']} | {c['variant']} | {_fmt_ratio(c['ratio'])} "
                f"| {c['cpu_ratio']['median']:.3f} | ±{w['noise']:.3f} |"
            )
        lines.append("")
    lines += [
        "**Speed claims**",
        "",
        "| workload | claim | median [min-max] | CPU ratio | noise | status |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for w in results["workloads"]:
        for c in w["claims"]:
            status = c["status"] + ("" if c["resolved"] else " (unresolved)")
            lines.append(
                f"| {w['name']} | {c['description']} (`{c['claim']}`) | "
                f"{_fmt_ratio(c['ratio'])} | {_fmt_cpu(c)} | "
                f"±{c['noise']:.3f} | {status} |"
            )
    lines += [
        "",
        '"unresolved": the noise band is wider than the distance between '
        "the median and the bound; a quieter machine could change the "
        "status.",
    ]
    return "\n".join(lines) + "\n"


def table(results):
    """The report as a plain-text table for the terminal."""
    out = [_machine_line(results)]
    out += results["warnings"]
    for w in results["workloads"]:
        out.append("")
        out.append(
            f"{w['name']}: batch {w['batch']}, {w['steps']} steps, "
            f"reference {w['reference']}, noise ±{w['noise']:.3f}, "
            f"data {w['data']}"
        )
        out += [f"  note: {n}" for n in w["notes"]]
        memory = _device_memory(w)
        out.append(
            f"  {'variant':24s} {'ratio [min-max]':22s} {'cpu':>5s} "
            f"{'/floor':>6s} "
            f"{'ms/step':>8s} {'us/smpl':>8s} {'warm-up':>7s} "
            + (f"{'dev MiB':>7s} " if memory else "")
            + f"{'eval loss':>12s} {'acc':>5s}  verdict"
        )
        for v in w["variants"]:
            eval_loss, eval_acc = _fmt_eval(v)
            out.append(
                f"  {v['name']:24s} {_fmt_ratio(v['ratio']):22s} "
                f"{_fmt_cpu(v):>5s} "
                f"{v['ratio_to_floor']:6.2f} {v['step_ms']:8.2f} "
                f"{v['sample_us']:8.1f} {v['warmup_s']:7.2f} "
                + (f"{_fmt_mib(v['device_peak_mib']):>7s} " if memory else "")
                + f"{eval_loss:>12s} {eval_acc:>5s}  {v['verdict']}"
            )
    for w in results["workloads"]:
        for c in w.get("check_costs", []):
            out.append(
                f"  {w['name']:10s} class-id check: {c['variant']} / "
                f"without it {_fmt_ratio(c['ratio'])} cpu "
                f"{c['cpu_ratio']['median']:.3f}"
            )
    out.append("")
    out.append("Claims:")
    for w in results["workloads"]:
        for c in w["claims"]:
            resolved = "" if c["resolved"] else " (unresolved: noise)"
            out.append(
                f"  {w['name']:10s} {c['claim']:46s} "
                f"{_fmt_ratio(c['ratio'])} cpu {_fmt_cpu(c)}  "
                f"{c['status']}{resolved}"
            )
    return "\n".join(out)


WORKLOAD_TITLES = {
    "mlp": "MLP",
    "vgg_cnn": "VGG-like CNN",
    "cifar_cnn": "CNN on 32x32 colour images",
    "multi_io": "two named inputs, two outputs",
    "dcgan": "DCGAN (two networks, two optimizers)",
}
_PLAIN = {
    "fitcustom_fit": "fit() with fitcustom",
    "builtin_fit": "Keras fit()",
    "builtin_fit_repeat": "Keras fit() again (noise check)",
    "loop_tf_function": "hand-written loop (tf.function)",
    "loop_tf_function_repeat": "hand-written loop again (noise check)",
    "loop_eager": "hand-written loop, eager",
    "floor_while_loop": "whole loop in one graph (lower bound)",
}


def plain_name(name, reference):
    """A variant's name in words, for the chart."""
    unchecked = name.endswith("_unchecked")
    base, _, spe = name.removesuffix("_unchecked").partition("_spe")
    if base == "builtin_fit" and reference != "builtin_fit":
        words = "fit(), hand-written train_step"
    else:
        words = _PLAIN.get(base, base)
    words = f"{words}, {spe} steps per call" if spe else words
    return f"{words}, no class-id check" if unchecked else words


def chart(results, path):
    """Time per step of each variant against the workload's reference
    (median and min-max over rounds) with the noise band, one panel per
    workload, as a PNG."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    workloads = results["workloads"]
    cols = min(2, len(workloads))
    rows_ = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(
        rows_, cols, figsize=(6.8 * cols, 0.8 + 3.2 * rows_), squeeze=False
    )
    for ax in axes.flat[len(workloads) :]:
        ax.axis("off")
    for ax, w in zip(axes.flat, workloads):
        variants = w["variants"]
        names = [plain_name(v["name"], w["reference"]) for v in variants]
        med = [v["ratio"]["median"] for v in variants]
        low = [v["ratio"]["median"] - v["ratio"]["min"] for v in variants]
        high = [v["ratio"]["max"] - v["ratio"]["median"] for v in variants]
        y = range(len(variants))
        ax.axvspan(
            1 - w["noise"],
            1 + w["noise"],
            color="grey",
            alpha=0.2,
            label="noise band",
        )
        ax.axvline(1.0, color="black", lw=1)
        ax.errorbar(
            med,
            y,
            xerr=[low, high],
            fmt="o",
            color="#4477aa",
            capsize=3,
            label="median, min-max",
        )
        ax.set_yticks(list(y), names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        reference = plain_name(w["reference"], w["reference"])
        ax.set_xlabel("time per step / the reference's (lower is faster)")
        ax.set_title(
            f"{WORKLOAD_TITLES.get(w['name'], w['name'])}\n"
            f"reference: {reference}",
            fontsize="medium",
        )
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.suptitle(
        f"Training speed on {results['machine']['device']} "
        f"({results['rounds']} rounds; 1 = as fast as the reference)"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    # "tight": long variant names widen a one-panel figure past its size.
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write(results, output_dir):
    """Writes results.json, results.csv, results.md and ratios.png.

    Returns:
        The paths, by format.
    """
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "json": os.path.join(output_dir, "results.json"),
        "csv": os.path.join(output_dir, "results.csv"),
        "markdown": os.path.join(output_dir, "results.md"),
        "png": os.path.join(output_dir, "ratios.png"),
    }
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    flat = rows(results)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write(markdown(results))
    chart(results, paths["png"])
    return paths
