"""Prints one screen on what the main job's runs gave: the classifier's
test accuracy, the GAN's last losses, the speed headline, and where each
model and picture is.

Usage: python -m scripts.summary --output-dir outputs
"""

import json
import os

from scripts._common import SUMMARY
from scripts._common import make_parser


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _speed_line(results):
    """fitcustom's fit() against each workload's reference, in one line."""
    parts = []
    for w in results["workloads"]:
        ratios = {v["name"]: v["ratio"]["median"] for v in w["variants"]}
        if "fitcustom_fit" in ratios:
            parts.append(f"{w['name']} {ratios['fitcustom_fit']:.2f}")
    return ", ".join(parts)


def lines(out):
    """The summary of the runs under `out`, as lines of text."""
    rows = [f"Summary of the runs in {out}"]
    classifier = _read(os.path.join(out, "classifier", SUMMARY))
    if classifier:
        rows += [
            f"  Classifier   {classifier['model'].upper()} on "
            f"{classifier['dataset']}: test accuracy "
            f"{classifier['test_accuracy']:.4f} (the test images were used "
            "for nothing else)",
            f"               best epoch on validation: "
            f"{classifier['best_epoch']} of {classifier['epochs']} "
            f"(validation accuracy {classifier['val_accuracy']:.4f})",
            f"               model {classifier['model_path']}",
            f"               curves {classifier['curves']}",
        ]
    else:
        rows.append(
            "  Classifier   not run yet (bash scripts/run.sh classifier)"
        )
    gan = _read(os.path.join(out, "gan", SUMMARY))
    if gan:
        rows += [
            f"  GAN          {gan['epochs']} epochs ({gan['loss']} loss): "
            f"discriminator loss {gan['d_loss']:.3f}, generator loss "
            f"{gan['g_loss']:.3f}",
            f"               sample quality (lower is better): KID "
            f"{gan['kid']:.2f}, FID {gan['fid']:.2f}",
            f"               (real images score KID {gan['kid_real']:.2f}, "
            f"FID {gan['fid_real']:.2f}; the untrained generator KID "
            f"{gan['kid_untrained']:.2f}, FID {gan['fid_untrained']:.2f})",
            f"               samples {gan['last_grid']}",
            f"               generator {gan['generator_path']}",
            f"               curves {gan['curves']}",
        ]
    else:
        rows.append("  GAN          not run yet (bash scripts/run.sh gan)")
    bench = os.path.join(out, "benchmark")
    speed = _read(os.path.join(bench, "results.json"))
    if speed:
        rows += [
            "  Speed        time per step of fit() with fitcustom / the "
            "reference (1.00 = as fast,",
            f"               lower is faster; {speed['profile']} profile, "
            f"{speed['rounds']} rounds): {_speed_line(speed)}",
            f"               table {os.path.join(bench, 'results.md')}",
            f"               chart {os.path.join(bench, 'ratios.png')}",
        ]
    else:
        rows.append(
            "  Speed        not run yet (bash scripts/run.sh benchmark)"
        )
    if classifier:
        rows.append(
            f"  TensorBoard  tensorboard --logdir {classifier['tensorboard']}"
        )
    return rows


def main(argv=None):
    parser = make_parser(__doc__, "scripts.summary")
    parser.add_argument(
        "--output-dir", default="outputs", help="the main job's outputs"
    )
    args = parser.parse_args(argv)
    print("\n".join(lines(args.output_dir)))


if __name__ == "__main__":
    main()
