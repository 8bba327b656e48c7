"""Example programs of step shapes fitcustom has no task model for, each
written with the engine's tools for a step of your own
(`python -m scripts.examples.NAME --output-dir D`)."""

import os

# Before TensorFlow loads: no C++ info and warning lines (errors still
# show). The examples run as `python -m scripts.examples.NAME`, so this
# runs first.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
