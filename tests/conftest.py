"""Test setup: split the CPU into two logical devices before any TF op.

Multi-replica tests use `tf.distribute.MirroredStrategy(["/cpu:0",
"/cpu:1"])`; single-device tests run on the default strategy (CPU:0).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration()] * 2,
)

TWO_CPUS = ["/cpu:0", "/cpu:1"]


@pytest.fixture(scope="session")
def two_replicas():
    """A MirroredStrategy over the two logical CPU devices.

    One instance for the whole session: several MirroredStrategy instances
    in one process can reuse collective keys and abort each other's
    all-reduces ("Shape mismatch in the collective instance").
    """
    return tf.distribute.MirroredStrategy(TWO_CPUS)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from float32, a clear session and fixed seeds."""
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture
def rng():
    return np.random.default_rng(0)
