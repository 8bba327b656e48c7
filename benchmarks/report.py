"""Benchmark report: terminal table, JSON, CSV, Markdown and a PNG chart."""

import csv
import json
import os


def _fmt_ratio(r):
    return f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]"


ROW_KEYS = (
    "ratio",
    "step_ms",
    "sample_us",
    "warmup_s",
    "final_loss",
    "rss_mib",
    "verdict",
)


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
                    "ratio_median": v["ratio"]["median"],
                    "ratio_min": v["ratio"]["min"],
                    "ratio_max": v["ratio"]["max"],
                    "ratio_to_floor": v["ratio_to_floor"],
                    "step_ms": v["step_ms"],
                    "sample_us": v["sample_us"],
                    "warmup_s": v["warmup_s"],
                    "final_loss": v["final_loss"],
                    "first_loss": v["first_loss"],
                    "rss_mib": v["rss_mib"],
                    "steps": v["steps"],
                    "verdict": v["verdict"],
                }
            )
    return out


def markdown(results):
    m = results["machine"]
    lines = [
        f"### Training speed ({results['profile']} profile)",
        "",
        f"Device: {m['device']}; TensorFlow {m['tensorflow']}, Keras "
        f"{m['keras']}; {m['cpu_count']} CPU cores; jit_compile="
        f"{results['jit_compile']}; {results['rounds']} interleaved rounds; "
        "synthetic data of the real shapes. Ratio = variant time / "
        "reference time in the same round (median [min-max]); below 1 is "
        "faster. Noise band: the reference timed twice per round.",
        "",
    ]
    for w in results["workloads"]:
        lines += [
            f"**{w['name']}** (batch {w['batch']}, {w['steps']} steps; "
            f"reference `{w['reference']}`; noise band "
            f"±{w['noise']:.3f})",
            "",
            "| variant | ratio to reference | ratio to floor | ms/step | "
            "µs/sample | warm-up s | loss first→last | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for v in w["variants"]:
            lines.append(
                f"| {v['name']} | {_fmt_ratio(v['ratio'])} | "
                f"{v['ratio_to_floor']:.2f} | {v['step_ms']:.2f} | "
                f"{v['sample_us']:.1f} | {v['warmup_s']:.2f} | "
                f"{v['first_loss']:.4f}→{v['final_loss']:.4f} | "
                f"{v['verdict']} |"
            )
        lines.append("")
    lines.append(f"Peak RSS of the process: {m['peak_rss_mib']:.0f} MiB.")
    return "\n".join(lines) + "\n"


def table(results):
    out = []
    for w in results["workloads"]:
        out.append(
            f"{w['name']} (reference {w['reference']}, noise ±{w['noise']:.3f})"
        )
        out.append(
            f"  {'variant':28s} {'ratio [min-max]':24s} "
            f"{'ms/step':>8s} {'warm-up':>8s} {'loss':>8s}  verdict"
        )
        for v in w["variants"]:
            out.append(
                f"  {v['name']:28s} {_fmt_ratio(v['ratio']):24s} "
                f"{v['step_ms']:8.2f} {v['warmup_s']:8.2f} "
                f"{v['final_loss']:8.4f}  {v['verdict']}"
            )
    return "\n".join(out)


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = results["workloads"]
    fig, axes = plt.subplots(
        1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False
    )
    for ax, w in zip(axes[0], workloads):
        names = [v["name"] for v in w["variants"]]
        med = [v["ratio"]["median"] for v in w["variants"]]
        low = [v["ratio"]["median"] - v["ratio"]["min"] for v in w["variants"]]
        high = [v["ratio"]["max"] - v["ratio"]["median"] for v in w["variants"]]
        ax.barh(names, med, xerr=[low, high], color="#4477aa", capsize=3)
        ax.axvline(1.0, color="black", lw=1)
        ax.axvspan(1 - w["noise"], 1 + w["noise"], color="grey", alpha=0.2)
        ax.set_xscale("log")
        ax.set_title(f"{w['name']}: time / {w['reference']}")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results, output_dir):
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
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results))
    chart(results, paths["png"])
    return paths
