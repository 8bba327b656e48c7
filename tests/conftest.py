"""Test setup: split the CPU into two logical devices before any TF op.

Multi-replica tests use `fitcustom.testing.two_replicas()`, a
MirroredStrategy over the two; single-device tests run on the default
strategy (CPU:0).
"""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The Keras folder is one of this test run, not ~/.keras: files fitcustom
# keeps there (GANQuality's digits feature extractor) are made fresh, once
# for all the run's test processes (written atomically), and a user's
# keras.json (another backend, say) does not apply.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    os.environ["KERAS_HOME"] = os.path.join(
        tempfile.gettempdir(), f"fitcustom-tests-keras-{_RUN}"
    )
    os.makedirs(os.environ["KERAS_HOME"], exist_ok=True)
else:
    os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="fitcustom-tests-keras-")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import fitcustom.testing  # noqa: E402

fitcustom.testing.split_cpu(2)


#: Test files whose tests share module fixtures (a benchmark run, the
#: uninterrupted runs, extractors): each runs whole in one test process.
WHOLE_FILES = {"test_benchmark.py", "test_preemption.py", "test_quality.py"}


def pytest_collection_modifyitems(config, items):
    """The slow tests first: the two test processes take tests one at a
    time (see `pytest_xdist_make_scheduler`), so that the run ends on
    short tests, with both processes busy to the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_xdist_make_scheduler(config, log):
    """With `--dist loadscope` (scripts/test.sh): one test per unit of
    work, except the files of `WHOLE_FILES`, one unit each. (xdist's own
    `loadgroup` does not group under pytest 9, whose nodes keep their id
    where xdist no longer writes the group's name.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneTestOrWholeFile(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if os.path.basename(path) in WHOLE_FILES else nodeid

    return OneTestOrWholeFile(config, log)


@pytest.fixture(scope="session")
def two_replicas():
    """A MirroredStrategy over the two logical CPU devices.

    One instance for the whole session: several MirroredStrategy instances
    in one process can reuse collective keys and abort each other's
    all-reduces ("Shape mismatch in the collective instance").
    """
    return fitcustom.testing.two_replicas()


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
