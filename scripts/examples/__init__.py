"""Example programs of step shapes fitcustom has no task model for, each
written with the engine's tools for a step of your own
(`python -m scripts.examples.NAME --output-dir D`)."""

# Before TensorFlow loads (the examples run as `python -m
# scripts.examples.NAME`, so this runs first): TF_CPP_MIN_LOG_LEVEL=2, no
# C++ info and warning lines (errors still show), also for what
# TensorFlow prints while it loads.
from scripts._common import load_tensorflow

load_tensorflow()
