"""MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1.

Keras 3.15's built-in `fit()` fails there (CONTRACT.md, Distribution);
fitcustom's engine works around it in `fitcustom._compat`. Two workers must
train the weights and log the history of a single process on the same
global batches. Every run has a hard timeout and kills only the process
groups the launcher started.
"""

import importlib.util
import io
import json
import sys
import textwrap

import keras
import numpy as np
import pytest
from helpers import assert_history_close
from helpers import assert_weights_close

from scripts import launch_workers

JOB = textwrap.dedent(
    """
    import json, os, sys
    import keras
    import numpy as np
    import tensorflow as tf
    import fitcustom
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from job_common import data, make_model

    out, kind = sys.argv[1], sys.argv[2]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    x, y = data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    elements = (x, y) if kind != "gan" else x
    ds = tf.data.Dataset.from_tensor_slices(elements).batch(16)
    ds = ds.with_options(options)
    with strategy.scope():
        model = make_model(kind)
    history = model.fit(ds, epochs=2, verbose=0).history
    evaluation = model.evaluate(ds, verbose=0, return_dict=True)
    np.savez(os.path.join(out, f"weights{index}.npz"), *model.get_weights())
    with open(os.path.join(out, f"logs{index}.json"), "w") as f:
        json.dump({"history": history, "evaluate": evaluation}, f)
    """
)

COMMON = textwrap.dedent(
    """
    import keras
    import numpy as np
    import tensorflow as tf
    import fitcustom

    def data():
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 6)).astype("float32")
        y = rng.integers(0, 3, size=64).astype("int32")
        return x, y

    NOISE = np.random.default_rng(1).normal(size=(8, 2, 16, 4)).astype(
        "float32")

    class FedGAN(fitcustom.TapeGAN):
        # Noise for the global batch of step i; each replica takes its rows.
        def sample_latent(self, batch_size, stream):
            step = tf.cast(self.g_optimizer.iterations, tf.int32)
            rows = tf.gather(tf.constant(NOISE), step)[stream]
            ctx = tf.distribute.get_replica_context()
            start = ctx.replica_id_in_sync_group * batch_size
            return rows[start:start + batch_size]

    def make_model(kind):
        keras.utils.set_random_seed(0)
        if kind == "gan":
            z = keras.Input((4,))
            generator = keras.Model(z, keras.layers.Dense(6)(
                keras.layers.Dense(8, activation="relu")(z)))
            x = keras.Input((6,))
            discriminator = keras.Model(x, keras.layers.Dense(1)(
                keras.layers.Dense(8, activation="relu")(x)))
            model = FedGAN(generator=generator, discriminator=discriminator,
                           latent_dim=4)
            model.compile(d_optimizer=keras.optimizers.Adam(1e-2),
                          g_optimizer=keras.optimizers.Adam(1e-2))
            return model
        inputs = keras.Input((6,))
        h = keras.layers.Dense(16, activation="relu")(inputs)
        cls = {"engine": fitcustom.TapeModel,
               "classifier": fitcustom.TapeClassifier}[kind]
        model = cls(inputs, keras.layers.Dense(3)(h))
        kwargs = dict(
            gradient_transforms=[fitcustom.ClipByGlobalNorm(1.0)],
            log_gradient_norm=True,
        )
        if kind == "engine":
            kwargs.update(
                optimizer="adam", metrics=["accuracy"],
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True),
            )
        model.compile(**kwargs)
        return model
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["engine", "classifier", "gan"])
def test_two_workers_train_what_one_process_trains(tmp_path, monkeypatch, kind):
    (tmp_path / "job.py").write_text(JOB)
    (tmp_path / "job_common.py").write_text(COMMON)
    log = io.StringIO()
    codes = launch_workers.launch(
        [sys.executable, str(tmp_path / "job.py"), str(tmp_path), kind],
        workers=2,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "3"},
        output=log,
    )
    assert codes == [0, 0], log.getvalue()[-4000:]

    spec = importlib.util.spec_from_file_location(
        f"job_common_{kind}", tmp_path / "job_common.py"
    )
    job_common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job_common)
    x, y = job_common.data()
    single = job_common.make_model(kind)
    if kind == "gan":
        y = None
    history = single.fit(
        x, y, batch_size=16, epochs=2, shuffle=False, verbose=0
    ).history
    evaluation = single.evaluate(
        x, y, batch_size=16, verbose=0, return_dict=True
    )
    for index in (0, 1):
        with np.load(tmp_path / f"weights{index}.npz") as f:
            weights = [f[f"arr_{i}"] for i in range(len(f.files))]
        assert_weights_close(single.get_weights(), weights, atol=1e-6)
        logs = json.loads((tmp_path / f"logs{index}.json").read_text())
        assert_history_close(history, logs["history"], rtol=1e-5)
        assert sorted(logs["evaluate"]) == sorted(evaluation)
        if kind == "gan":
            continue  # evaluate() draws per-replica noise: not comparable
        for key, value in evaluation.items():
            assert logs["evaluate"][key] == pytest.approx(value, rel=1e-5)


def test_failing_worker_stops_the_cluster(tmp_path):
    """A worker that dies must not leave its peer blocked forever."""
    script = tmp_path / "die.py"
    script.write_text(
        "import json, os, sys, time\n"
        "if json.loads(os.environ['TF_CONFIG'])['task']['index'] == 1:\n"
        "    sys.exit(3)\n"
        "time.sleep(120)\n"
    )
    log = io.StringIO()
    codes = launch_workers.launch(
        [sys.executable, str(script)], workers=2, timeout=60, output=log
    )
    assert codes[1] == 3 and codes[0] != 0  # the sleeper was killed


def test_timeout_kills_the_workers(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(120)\n")
    with pytest.raises(TimeoutError, match="did not finish"):
        launch_workers.launch(
            [sys.executable, str(script)],
            workers=2,
            timeout=2,
            output=io.StringIO(),
        )


def test_launcher_command_line_errors(capsys):
    with pytest.raises(SystemExit):
        launch_workers.main(["--workers", "0", "--", "x.py"])
    assert "--workers must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch_workers.main(["--", "missing_script.py"])
    assert "no such script" in capsys.readouterr().err


def test_keras_version_guard_names_the_version(monkeypatch):
    from fitcustom import _compat

    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(RuntimeError, match="3.99.0"):
        _compat.check_keras_version("Multi-worker training", strict=True)
