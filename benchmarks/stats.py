"""Statistics of the speed benchmark: paired ratios, noise band, verdicts,
and the speed targets (`workload_claims`).

All functions take per-round times per step (seconds), one list per
variant, rounds aligned: element `r` of every list was measured in round
`r`.
"""

MIN_NOISE = 0.01


def median(values):
    """The median of a non-empty sequence."""
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def paired_ratio(times, reference):
    """Round-by-round ratios `times[r] / reference[r]`.

    Returns:
        `{"median", "min", "max", "rounds"}`.
    """
    ratios = [a / b for a, b in zip(times, reference, strict=True)]
    return {
        "median": median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": ratios,
    }


def noise_band(reference, repeat):
    """Half-width of the noise band: the largest `|A'/A - 1|` over rounds,
    where A and A' are the same variant timed twice per round (at least
    `MIN_NOISE`)."""
    spread = max(abs(b / a - 1) for a, b in zip(reference, repeat, strict=True))
    return max(MIN_NOISE, spread)


def verdict(ratio, noise):
    """ "faster" / "slower" only if the whole min-max interval of the paired
    ratio lies outside `1 +- noise`; otherwise "within noise"."""
    if ratio["max"] < 1 - noise:
        return "faster"
    if ratio["min"] > 1 + noise:
        return "slower"
    return "within noise"


def claim(name, times, against, bound, noise, description, cpu=None):
    """Checks `median(times / against) <= bound`.

    Status: "holds" (median within the bound), "fails within noise" (above
    the bound by less than the noise band: this run cannot tell), "fails"
    (above the bound by more than the noise band). `resolved` is False when
    the noise band is wider than the distance between the median and the
    bound, i.e. when a quieter run could flip the status. `cpu`, a pair
    `(times, against)` of CPU times per step, adds the same ratio in CPU
    time as a second measure (`cpu_ratio`); the status is the wall time's.
    """
    ratio = paired_ratio(times, against)
    gap = ratio["median"] - bound
    if gap <= 0:
        status = "holds"
    elif gap <= noise:
        status = "fails within noise"
    else:
        status = "fails"
    return {
        "claim": name,
        "description": description,
        "bound": bound,
        "ratio": ratio,
        "noise": noise,
        "status": status,
        "resolved": abs(gap) > noise,
        "cpu_ratio": None if cpu is None else paired_ratio(*cpu),
    }


def check_costs(step_times, cpu_step_times, suffix):
    """What a check costs: for each variant `name + suffix` (the same
    variant without the check), the paired ratio `name / name + suffix`
    in wall and CPU time (above 1: the check costs that share of a step).

    Returns:
        `[{"variant", "ratio", "cpu_ratio"}]`, empty when no variant ends
        with `suffix`.
    """
    out = []
    for unchecked in step_times:
        name = unchecked[: -len(suffix)]
        if not unchecked.endswith(suffix) or name not in step_times:
            continue
        out.append(
            {
                "variant": name,
                "ratio": paired_ratio(step_times[name], step_times[unchecked]),
                "cpu_ratio": paired_ratio(
                    cpu_step_times[name], cpu_step_times[unchecked]
                ),
            }
        )
    return out


def workload_claims(step_times, noise, spe, is_gan, cpu_step_times=None):
    """The speed targets for one workload, from per-step times by variant.

    - fitcustom `fit()` / built-in `fit()` <= 1.02 (for the GAN: built-in
      `fit()` with the hand-written step as `train_step`, where it was run);
    - GAN: `TapeGAN.fit` / the hand-written GAN loop <= 1.02;
    - fitcustom `fit()` with `steps_per_execution=spe` / the hand-written
      `tf.function` loop <= 1.00.

    Claims whose variants were not run are left out. With
    `cpu_step_times` (same layout, CPU seconds) each claim also carries
    its ratio in CPU time.
    """

    def cpu(name, against):
        if cpu_step_times is None:
            return None
        return cpu_step_times[name], cpu_step_times[against]

    out = []
    label = "TapeGAN.fit" if is_gan else "fitcustom fit()"
    references = [("builtin_fit", "built-in fit()")]
    if is_gan:
        references = [
            ("loop_tf_function", "hand-written tf.function GAN loop"),
            ("builtin_fit", "built-in fit() with a hand-written train_step"),
        ]
    for reference, other in references:
        if "fitcustom_fit" in step_times and reference in step_times:
            out.append(
                claim(
                    f"fitcustom_fit / {reference} <= 1.02",
                    step_times["fitcustom_fit"],
                    step_times[reference],
                    1.02,
                    noise,
                    f"{label} within 2% of the {other}",
                    cpu=cpu("fitcustom_fit", reference),
                )
            )
    tuned = f"fitcustom_fit_spe{spe}"
    if tuned in step_times and "loop_tf_function" in step_times:
        out.append(
            claim(
                f"{tuned} / loop_tf_function <= 1.00",
                step_times[tuned],
                step_times["loop_tf_function"],
                1.0,
                noise,
                f"{label} with steps_per_execution={spe} at least as fast "
                "as the hand-written tf.function loop",
                cpu=cpu(tuned, "loop_tf_function"),
            )
        )
    return out
