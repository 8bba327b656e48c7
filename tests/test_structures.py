"""Every data and model structure Keras accepts, in parity with built-in fit().

Each case builds the same functional graph twice (a `keras.Model` and a
`fitcustom.TapeModel`) with the same initial weights, compiles both with the
same arguments, trains both on the same data and compares every weight
(<= 1e-6) and every logged number (relative 1e-6), in every execution mode
and on two replicas.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import MODES
from helpers import assert_history_close
from helpers import assert_weights_close
from helpers import max_abs_diff
from helpers import strategy_scope

import fitcustom

N = 40
BATCH = 8


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------
# Structures: each returns (graph builder, compile kwargs, x, y, extra fit
# kwargs). The builder returns (inputs, outputs) of a fresh graph.
# ----------------------------------------------------------------------


def named_inputs_graph(units):
    """A builder of a graph with inputs named "a" (4) and "b" (3) and one
    output of `units`."""

    def graph():
        a = keras.Input((4,), name="a")
        b = keras.Input((3,), name="b")
        h = keras.layers.Dense(8, activation="relu")(
            keras.layers.Concatenate()([a, b])
        )
        return {"a": a, "b": b}, keras.layers.Dense(units)(h)

    return graph


def named_inputs_data(rng):
    """Inputs for `named_inputs_graph`, drawn from `rng`."""
    return {
        "a": rng.normal(size=(N, 4)).astype("float32"),
        "b": rng.normal(size=(N, 3)).astype("float32"),
    }


def dict_inputs():
    rng = _rng(1)
    x = named_inputs_data(rng)
    y = rng.normal(size=(N, 1)).astype("float32")
    graph = named_inputs_graph(1)
    return graph, dict(loss="mse", metrics=["mae"]), x, y, {}


def dict_outputs():
    def graph():
        x = keras.Input((5,), name="x")
        h = keras.layers.Dense(8, activation="relu")(x)
        y1 = keras.layers.Dense(1, name="y1")(h)
        y2 = keras.layers.Dense(3, activation="softmax", name="y2")(h)
        return x, {"y1": y1, "y2": y2}

    rng = _rng(2)
    x = rng.normal(size=(N, 5)).astype("float32")
    y = {
        "y1": rng.normal(size=(N, 1)).astype("float32"),
        "y2": rng.integers(0, 3, size=(N,)).astype("int32"),
    }
    compile_kwargs = dict(
        loss={"y1": "mse", "y2": "sparse_categorical_crossentropy"},
        loss_weights={"y1": 0.5, "y2": 2.0},
        metrics={"y1": ["mae"], "y2": ["accuracy"]},
    )
    sample_weight = {
        "y1": rng.uniform(0.1, 2.0, size=(N,)).astype("float32"),
        "y2": rng.uniform(0.1, 2.0, size=(N,)).astype("float32"),
    }
    return graph, compile_kwargs, x, y, dict(sample_weight=sample_weight)


def list_inputs_and_outputs():
    def graph():
        a = keras.Input((4,), name="a")
        b = keras.Input((2,), name="b")
        h = keras.layers.Dense(8, activation="tanh")(
            keras.layers.Concatenate()([a, b])
        )
        out_a = keras.layers.Dense(1, name="out_a")(h)
        return [a, b], [out_a, keras.layers.Dense(2, name="out_b")(h)]

    rng = _rng(3)
    x = [
        rng.normal(size=(N, 4)).astype("float32"),
        rng.normal(size=(N, 2)).astype("float32"),
    ]
    y = [
        rng.normal(size=(N, 1)).astype("float32"),
        rng.normal(size=(N, 2)).astype("float32"),
    ]
    compile_kwargs = dict(
        loss=["mse", "mae"], loss_weights=[1.0, 0.3], metrics=[["mae"], []]
    )
    return graph, compile_kwargs, x, y, {}


def nested_inputs_dict_outputs():
    """Named inputs, one of them a nested dict; two named outputs with a
    loss, a loss weight, metrics and sample weights each."""

    def graph():
        a = keras.Input((3,), name="a")
        b = keras.Input((2,), name="b")
        c = keras.Input((2,), name="c")
        h = keras.layers.Concatenate()([a, keras.layers.Add()([b, c])])
        h = keras.layers.Dense(8, activation="relu")(h)
        y1 = keras.layers.Dense(1, name="y1")(h)
        y2 = keras.layers.Dense(3, activation="softmax", name="y2")(h)
        return {"a": a, "pair": {"b": b, "c": c}}, {"y1": y1, "y2": y2}

    rng = _rng(4)
    x = {
        "a": rng.normal(size=(N, 3)).astype("float32"),
        "pair": {
            "b": rng.normal(size=(N, 2)).astype("float32"),
            "c": rng.normal(size=(N, 2)).astype("float32"),
        },
    }
    _, compile_kwargs, _, y, fit_kwargs = dict_outputs()
    return graph, compile_kwargs, x, y, fit_kwargs


# (Flat dict inputs and dict outputs alone: see the dataset, PyDataset,
# short-batch and save tests below.)
STRUCTURES = {
    "nested_inputs_dict_outputs": nested_inputs_dict_outputs,
    "list_inputs_and_outputs": list_inputs_and_outputs,
}


def make_pair(graph, strategy=None, cls=fitcustom.TapeModel):
    scope = strategy_scope(strategy)
    with scope:
        reference = keras.Model(*graph())
        ours = cls(*graph())
        ours.set_weights(reference.get_weights())
    return reference, ours


def compile_pair(models, compile_kwargs, strategy=None, **mode):
    scope = strategy_scope(strategy)
    with scope:
        for model in models:
            model.compile(optimizer="adam", **compile_kwargs, **mode)


def fit_both(models, x, y, **kwargs):
    kwargs = dict(
        dict(batch_size=BATCH, epochs=2, shuffle=False, verbose=0), **kwargs
    )
    return [m.fit(x, y, **kwargs).history for m in models]


def assert_parity(reference, ours, h_ref, h_ours):
    assert_weights_close(reference.get_weights(), ours.get_weights())
    assert_history_close(h_ref, h_ours)


# ----------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("structure", list(STRUCTURES), ids=list(STRUCTURES))
def test_fit_evaluate_predict_parity(structure, mode):
    graph, compile_kwargs, x, y, fit_kwargs = STRUCTURES[structure]()
    reference, ours = make_pair(graph)
    compile_pair((reference, ours), compile_kwargs, **MODES[mode])
    # Validation in whole batches: for a short one, see
    # test_short_last_batch_weighs_per_output_losses_by_size.
    xv = keras.tree.map_structure(lambda a: a[:16], x)
    yv = keras.tree.map_structure(lambda a: a[:16], y)
    h_ref, h_ours = fit_both(
        (reference, ours), x, y, validation_data=(xv, yv), **fit_kwargs
    )
    assert_parity(reference, ours, h_ref, h_ours)
    assert len(h_ours["loss"]) == 2 and "val_loss" in h_ours
    e_ref = reference.evaluate(xv, yv, verbose=0, return_dict=True)
    e_ours = ours.evaluate(xv, yv, verbose=0, return_dict=True)
    assert_history_close(e_ref, e_ours)
    p_ref = reference.predict(xv, verbose=0)
    p_ours = ours.predict(xv, verbose=0)
    keras.tree.map_structure(np.testing.assert_array_equal, p_ref, p_ours)


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("structure", list(STRUCTURES), ids=list(STRUCTURES))
def test_parity_on_two_replicas(structure, mode, two_replicas):
    """steps_per_execution > 1 on two replicas: see
    test_steps_per_execution_on_two_replicas; jit_compile: see
    test_jit_on_two_logical_cpus_fails_as_built_in_fit_does."""
    graph, compile_kwargs, x, y, fit_kwargs = STRUCTURES[structure]()
    if mode == "eager":  # the slowest mode on two replicas: one epoch
        fit_kwargs = dict(fit_kwargs, epochs=1)
    reference, ours = make_pair(graph, two_replicas)
    compile_pair((reference, ours), compile_kwargs, two_replicas, **MODES[mode])
    h_ref, h_ours = fit_both((reference, ours), x, y, **fit_kwargs)
    assert_parity(reference, ours, h_ref, h_ours)
    e_ref = reference.evaluate(x, y, batch_size=BATCH, verbose=0)
    e_ours = ours.evaluate(x, y, batch_size=BATCH, verbose=0)
    np.testing.assert_allclose(e_ours, e_ref, rtol=1e-6)


def test_jit_on_two_logical_cpus_fails_as_built_in_fit_does(two_replicas):
    """XLA cannot compile a step whose replicas' variables live on two
    logical devices of one CPU (TensorFlow's "tf.Variable on a different
    device" known issue): built-in fit() fails there, and fitcustom fails
    the same way, before any weight changes. Real accelerators have one
    device per replica."""
    graph, compile_kwargs, x, y, fit_kwargs = STRUCTURES[
        "list_inputs_and_outputs"
    ]()
    reference, ours = make_pair(graph, two_replicas)
    compile_pair(
        (reference, ours), compile_kwargs, two_replicas, jit_compile=True
    )
    before = ours.get_weights()
    for model in (reference, ours):
        with pytest.raises(
            tf.errors.InvalidArgumentError, match="located in device"
        ):
            fit_both((model,), x, y, **fit_kwargs)
    assert_weights_close(before, ours.get_weights(), atol=0)


@pytest.mark.parametrize("mode", ["graph", "steps_per_execution", "jit"])
def test_short_last_batch_weighs_per_output_losses_by_size(mode):
    """With a short last batch (13 = 8 + 5), each output's loss log is the
    mean over samples, as built-in fit() gives in eager mode. Built-in
    fit() in graph mode gives the mean over batches (Keras weighs these
    logs by the static batch size, unknown in its graph): the control."""
    graph, compile_kwargs, x, y, _ = dict_outputs()
    reference, ours = make_pair(graph)
    initial = reference.get_weights()
    compile_pair((reference,), compile_kwargs, run_eagerly=True)
    compile_pair((ours,), compile_kwargs, **MODES[mode])
    x, y = x[:13], keras.tree.map_structure(lambda a: a[:13], y)
    h_ref, h_ours = fit_both((reference, ours), x, y, validation_data=(x, y))
    assert_parity(reference, ours, h_ref, h_ours)
    e_ours = ours.evaluate(x, y, batch_size=13, verbose=0, return_dict=True)
    assert_history_close(
        {k: h_ours[f"val_{k}"][-1:] for k in e_ours},
        {k: [v] for k, v in e_ours.items()},
    )
    graph_fit = keras.Model(*graph())
    graph_fit.set_weights(initial)
    compile_pair((graph_fit,), compile_kwargs)
    h_graph = fit_both((graph_fit,), x, y)[0]
    assert abs(h_graph["y1_loss"][0] - h_ref["y1_loss"][0]) > 1e-3


@pytest.mark.parametrize("steps", [1, 2], ids=["one_step", "two_steps"])
def test_dict_dataset_parity(steps):
    """A tf.data dataset of dicts (issue reproduction: unhashable dict)."""
    graph, compile_kwargs, x, y, _ = dict_outputs()
    reference, ours = make_pair(graph)
    compile_pair((reference, ours), compile_kwargs, steps_per_execution=steps)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    h_ref = reference.fit(ds, epochs=2, verbose=0).history
    h_ours = ours.fit(ds, epochs=2, verbose=0).history
    assert_parity(reference, ours, h_ref, h_ours)
    e_ref = reference.evaluate(ds, verbose=0, return_dict=True)
    e_ours = ours.evaluate(ds, verbose=0, return_dict=True)
    assert_history_close(e_ref, e_ours)


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y

    def __len__(self):
        return N // BATCH

    def __getitem__(self, i):
        part = slice(i * BATCH, (i + 1) * BATCH)
        return (
            keras.tree.map_structure(lambda a: a[part], self.x),
            keras.tree.map_structure(lambda a: a[part], self.y),
        )


@pytest.mark.parametrize("mode", ["graph", "steps_per_execution"])
def test_py_dataset_and_generator_parity(mode):
    graph, compile_kwargs, x, y, _ = dict_inputs()
    reference, ours = make_pair(graph)
    compile_pair((reference, ours), compile_kwargs, **MODES[mode])
    # (shuffle=False: fit() shuffles the order of a PyDataset's batches.)
    fit = dict(epochs=2, shuffle=False, verbose=0)
    h_ref = reference.fit(_Batches(x, y), **fit).history
    h_ours = ours.fit(_Batches(x, y), **fit).history
    assert_parity(reference, ours, h_ref, h_ours)

    def generator():
        batches = _Batches(x, y)
        for i in range(len(batches)):
            yield batches[i]

    h_ref = reference.fit(generator(), verbose=0).history
    h_ours = ours.fit(generator(), verbose=0).history
    assert_parity(reference, ours, h_ref, h_ours)


class _AddIfGiven(keras.layers.Layer):
    def call(self, x, extra=None):
        return x if extra is None else x + extra


@pytest.mark.parametrize("mode", ["eager", "graph", "steps_per_execution"])
def test_optional_input_fed_none(mode):
    """An optional input that a generator feeds None (issue reproduction:
    '_OptionalImpl' object has no attribute 'shape')."""

    def graph():
        x = keras.Input((4,), name="x")
        extra = keras.Input((4,), name="extra", optional=True)
        return [x, extra], keras.layers.Dense(1)(_AddIfGiven()(x, extra))

    rng = _rng(5)
    x = rng.normal(size=(N, 4)).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")

    def batches(with_extra):
        for i in range(0, N, BATCH):
            extra = x[i : i + BATCH] * 0.5 if with_extra else None
            yield (x[i : i + BATCH], extra), y[i : i + BATCH]

    # The reference runs eagerly: after the switch from None to a value,
    # built-in fit() in graph mode ends 7.6e-5 away from its own eager
    # run (fitcustom's graph ends equal to it).
    reference, ours = make_pair(graph)
    compile_pair((reference,), dict(loss="mse"), run_eagerly=True)
    compile_pair((ours,), dict(loss="mse"), **MODES[mode])
    for with_extra in (False, True):
        h_ref = reference.fit(batches(with_extra), verbose=0).history
        h_ours = ours.fit(batches(with_extra), verbose=0).history
        assert_parity(reference, ours, h_ref, h_ours)


def test_parity_control_fails_on_other_loss_weights():
    """The comparison above can fail: other loss weights, other weights."""
    graph, compile_kwargs, x, y, fit_kwargs = dict_outputs()
    reference, ours = make_pair(graph)
    compile_pair((reference,), compile_kwargs)
    other = dict(compile_kwargs, loss_weights={"y1": 0.5, "y2": 1.9})
    compile_pair((ours,), other)
    fit_both((reference, ours), x, y, **fit_kwargs)
    assert max_abs_diff(reference.get_weights(), ours.get_weights()) > 1e-4


def test_compile_takes_keras_positional_order():
    """compile(optimizer, loss, loss_weights, metrics, ...) as in Keras."""
    graph, _, x, y, _ = dict_inputs()
    reference, ours = make_pair(graph)
    for model in (reference, ours):
        model.compile("sgd", "mse", None, ["mae"])
    h_ref, h_ours = fit_both((reference, ours), x, y)
    assert_parity(reference, ours, h_ref, h_ours)
    assert "mae" in h_ours
    classifier = fitcustom.TapeClassifier(*_classifier_graph())
    classifier.compile("sgd", None, None, ["accuracy"], None, False, 2)
    assert classifier.steps_per_execution == 2


# ----------------------------------------------------------------------
# A functional TapeModel is a Keras functional model
# ----------------------------------------------------------------------


def _classifier_graph():
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    return inputs, keras.layers.Dense(3, name="logits")(h)


def test_functional_api():
    graph, compile_kwargs, x, y, _ = dict_outputs()
    model = fitcustom.TapeModel(*graph(), name="two_heads")
    assert isinstance(model, keras.Model)
    assert isinstance(model, fitcustom.TapeModel)
    assert model.input.name == "x" and model.inputs == [model.input]
    assert sorted(model.output) == ["y1", "y2"] and len(model.outputs) == 2
    assert model.get_layer("y1").units == 1
    lines = []
    model.summary(print_fn=lines.append)
    assert "two_heads" in "\n".join(lines)
    with pytest.raises(AttributeError, match="reserved"):
        model.layers = []
    # As a layer inside another functional model and in a Sequential.
    outer_in = keras.Input((5,))
    outer = keras.Model(outer_in, model(outer_in)["y1"])
    np.testing.assert_allclose(
        outer.predict(x, verbose=0), model.predict(x, verbose=0)["y1"]
    )
    inputs, outputs = _classifier_graph()
    inner = fitcustom.TapeModel(inputs, outputs)
    sequential = keras.Sequential([inner, keras.layers.Softmax()])
    probabilities = sequential.predict(np.ones((4, 6)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    clone = keras.models.clone_model(model)
    assert isinstance(clone, fitcustom.TapeModel)
    assert clone.output_names == model.output_names
    clone.set_weights(model.get_weights())
    keras.tree.map_structure(
        np.testing.assert_array_equal,
        clone.predict(x, verbose=0),
        model.predict(x, verbose=0),
    )


def test_a_subclass_built_functionally_leaves_tape_model_alone():
    """Keras injects `Functional` into a subclass's bases at run time;
    fitcustom does not: TapeModel and subclasses with call() stay as
    they are after a functional one was built."""

    class Twice(fitcustom.TapeModel):
        pass

    functional = Twice(*_classifier_graph())
    assert isinstance(functional, Twice)
    assert keras.Model in fitcustom.TapeModel.__bases__
    assert Twice.__bases__ == (fitcustom.TapeModel,)

    class WithCall(fitcustom.TapeModel):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(2)

        def call(self, inputs, training=None):
            return self.dense(inputs)

    subclassed = WithCall()
    assert subclassed(np.ones((1, 3), "float32")).shape == (1, 2)
    with pytest.raises(AttributeError, match="not built from inputs"):
        _ = subclassed.inputs


@pytest.mark.parametrize("cls", ["TapeModel", "TapeClassifier"])
def test_export_serves_what_predict_returns(tmp_path, cls):
    """SavedModel export: the serving endpoint gives predict()'s numbers
    (for TapeClassifier, the network's output: logits here, as the
    serving endpoint runs `call()`, not `predict_step`)."""
    inputs, outputs = _classifier_graph()
    model = getattr(fitcustom, cls)(inputs, outputs)
    model.compile(optimizer="adam", loss=None if cls != "TapeModel" else "mse")
    rng = _rng(6)
    x = rng.normal(size=(N, 6)).astype("float32")
    y = rng.integers(0, 3, size=(N,))
    if cls == "TapeModel":
        y = keras.ops.convert_to_numpy(keras.ops.one_hot(y, 3))
    model.fit(x, y, epochs=1, verbose=0)
    model.export(tmp_path / "exported")
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    served = exported.serve(x)
    logits = keras.Model(inputs, outputs).predict(x, verbose=0)
    np.testing.assert_allclose(served.numpy(), logits, rtol=1e-5, atol=1e-6)
    predicted = model.predict(x, verbose=0)
    if cls == "TapeModel":
        np.testing.assert_allclose(served.numpy(), predicted, rtol=1e-5)
    else:  # predict() gives probabilities
        np.testing.assert_allclose(
            tf.nn.softmax(served).numpy(), predicted, rtol=1e-5, atol=1e-6
        )
    tf.saved_model.save(model, str(tmp_path / "saved"))
    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    assert "serving_default" in loaded.signatures


def test_dict_model_saves_and_loads(tmp_path):
    graph, compile_kwargs, x, y, fit_kwargs = dict_outputs()
    _, model = make_pair(graph)
    compile_pair((model,), compile_kwargs)
    fit_both((model,), x, y, **fit_kwargs)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert type(loaded).__name__ == "TapeModel"
    assert isinstance(loaded, fitcustom.TapeModel)
    h_model, h_loaded = fit_both((model, loaded), x, y, **fit_kwargs)
    assert_weights_close(model.get_weights(), loaded.get_weights(), atol=0)
    assert_history_close(h_model, h_loaded, rtol=0, atol=0)


# ----------------------------------------------------------------------
# Bad structures: refused before any weight changes
# ----------------------------------------------------------------------


def _refused(model, x, y, match):
    before = model.get_weights()
    with pytest.raises(ValueError, match=match):
        model.fit(x, y, batch_size=BATCH, verbose=0)
    assert_weights_close(before, model.get_weights(), atol=0)


def test_input_dict_with_extra_or_missing_key_is_refused():
    graph, compile_kwargs, x, y, _ = dict_inputs()
    reference, ours = make_pair(graph)
    compile_pair((reference, ours), compile_kwargs)
    extra = dict(x, c=x["a"])
    # Control: Keras only warns and trains, leaving the typo unused.
    before = reference.get_weights()
    reference.fit(extra, y, verbose=0)
    assert max_abs_diff(before, reference.get_weights()) > 0
    _refused(ours, extra, y, r"keys \['a', 'b', 'c'\].*not inputs.*\['c'\]")
    _refused(ours, {"a": x["a"]}, y, r"missing: \['b'\]")
    _refused(ours, [x["a"], x["b"]], y, r"named inputs \['a', 'b'\]")
    _refused(ours, x["a"], y, r"named inputs.*one ndarray")
    ds = tf.data.Dataset.from_tensor_slices((extra, y)).batch(BATCH)
    with pytest.raises(ValueError, match="not inputs of the model"):
        ours.fit(ds, verbose=0)


def test_list_model_given_the_wrong_count_is_refused():
    graph, compile_kwargs, x, y, _ = list_inputs_and_outputs()
    _, ours = make_pair(graph)
    compile_pair((ours,), compile_kwargs)
    _refused(ours, x[:1], y, "takes 2 inputs. Received: a list of 1")
    _refused(ours, {"a": x[0], "b": x[1], "z": x[0]}, y, r"\['z'\]")


def test_targets_not_matching_the_losses_are_refused():
    graph, compile_kwargs, x, y, _ = dict_outputs()
    reference, ours = make_pair(graph)
    only_y1 = dict(loss={"y1": "mse"})
    compile_pair((reference, ours), only_y1)
    # Control: Keras trains silently on targets for an output without a
    # loss and without the target of the output that has one.
    reference.fit(x, {"y2": y["y2"]}, verbose=0)
    _refused(ours, x, {"y2": y["y2"]}, r"\['y1'\], which have a loss")
    _refused(ours, x, y, r"\['y2'\] have no loss and no metric")
    _refused(ours, x, dict(y, y3=y["y1"]), r"\['y3'\] are not outputs")
    compile_pair((ours,), dict(only_y1, metrics={"y2": ["accuracy"]}))
    ours.fit(x, y, verbose=0)  # a metric reads y2's targets


# ----------------------------------------------------------------------
# Keras' own export tests (keras/src/export/saved_model_test.py), rewritten
# for TapeModel: same models and checks. Keras' model, trainer and saving
# tests run unchanged on fitcustom in test_keras_suite.py.
# ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_keras_export_multi_input_output(tmp_path, kind):
    """export/saved_model_test.py
    `test_multi_input_output_functional_model`, and
    backend/tensorflow/saved_model_test.py's `serving_default`."""
    x1, x2 = keras.Input((5,), name="x1"), keras.Input((5,), name="x2")
    y1 = keras.layers.Dense(3)(keras.layers.Concatenate()([x1, x2]))
    y2 = keras.layers.Dense(3)(keras.layers.Add()([x1, x2]))
    inputs = [x1, x2] if kind == "list" else {"x1": x1, "x2": x2}
    model = fitcustom.TapeModel(inputs, [y1, y2])
    rng = _rng(8)
    a, b = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    data = [a, b] if kind == "list" else {"x1": a, "x2": b}
    expected = model.predict(data, verbose=0)
    model.export(tmp_path / "exported")
    exported = tf.saved_model.load(str(tmp_path / "exported"))
    served = exported.serve(data)
    for s, e in zip(served, expected, strict=True):
        np.testing.assert_allclose(s.numpy(), e, rtol=1e-5, atol=1e-6)
    tf.saved_model.save(model, str(tmp_path / "saved"))
    saved = tf.saved_model.load(str(tmp_path / "saved"))
    serving = saved.signatures["serving_default"]
    outputs = (
        serving(**({"inputs": a, "inputs_1": b} if kind == "list" else data))
        if kind == "list"
        else None
    )
    if outputs is not None:
        np.testing.assert_allclose(
            outputs["output_0"].numpy(), expected[0], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("cls", ["TapeModel", "TapeClassifier"])
def test_metric_objects_are_the_compiled_metrics_only(cls):
    """A metric object given to compile() is not also tracked as one of
    the model's own metrics (as with keras.Model)."""
    inputs, outputs = _classifier_graph()
    reference = keras.Model(inputs, outputs)
    ours = getattr(fitcustom, cls)(inputs, outputs)
    for model in (reference, ours):
        model.compile(
            optimizer="sgd",
            loss="sparse_categorical_crossentropy",
            metrics=[keras.metrics.SparseCategoricalAccuracy()],
        )
    assert [m.name for m in ours.metrics] == [m.name for m in reference.metrics]


@pytest.mark.parametrize("mode", ["graph", "steps_per_execution"])
def test_classifier_with_dict_inputs_parity(mode, two_replicas):
    """TapeClassifier (its default loss and accuracy) on named inputs, in
    parity with built-in fit() on one device and on two replicas."""

    graph = named_inputs_graph(3)
    rng = _rng(9)
    x = named_inputs_data(rng)
    y = rng.integers(0, 3, size=(N,))
    for strategy in (None, two_replicas):
        reference, ours = make_pair(graph, strategy, fitcustom.TapeClassifier)
        scope = strategy_scope(strategy)
        # Built-in fit() with steps_per_execution > 1 under MirroredStrategy
        # fails in Keras 3.15 ("You must feed a value for placeholder
        # tensor", for any input; see the test below): there the reference
        # runs one step per call, which gives the same numbers.
        reference_mode = MODES[mode] if strategy is None else {}
        with scope:
            reference.compile(
                optimizer="adam",
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
                metrics=["accuracy"],
                **reference_mode,
            )
            ours.compile(**MODES[mode])
        h_ref, h_ours = fit_both(
            (reference, ours), x, y, validation_data=(x, y)
        )
        assert_parity(reference, ours, h_ref, h_ours)
        np.testing.assert_allclose(
            ours.predict(x, verbose=0).sum(axis=-1), 1.0, rtol=1e-5
        )


def test_steps_per_execution_on_two_replicas(two_replicas):
    """fitcustom runs steps_per_execution > 1 under MirroredStrategy with
    the numbers of one step per call; Keras 3.15's own multi-step loop
    fails there (the control)."""
    graph, compile_kwargs, x, y, fit_kwargs = STRUCTURES[
        "nested_inputs_dict_outputs"
    ]()
    reference, ours = make_pair(graph, two_replicas)
    compile_pair((reference,), compile_kwargs, two_replicas)
    compile_pair((ours,), compile_kwargs, two_replicas, steps_per_execution=3)
    h_ref, h_ours = fit_both(
        (reference, ours), x, y, validation_data=(x, y), **fit_kwargs
    )
    assert_parity(reference, ours, h_ref, h_ours)
    with two_replicas.scope():
        failing = keras.Model(*graph())
    compile_pair(
        (failing,), compile_kwargs, two_replicas, steps_per_execution=3
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="(?i)placeholder"):
        fit_both((failing,), x, y, **fit_kwargs)


@pytest.mark.parametrize("structure", list(STRUCTURES), ids=list(STRUCTURES))
def test_mixed_float16_parity(structure):
    """Under mixed_float16 (loss scaling, float16 outputs, per-output
    losses in float32) the structures train as built-in fit() trains them
    (the engine's test shows that skipping the loss scale fails this)."""
    keras.config.set_dtype_policy("mixed_float16")
    graph, compile_kwargs, x, y, fit_kwargs = STRUCTURES[structure]()
    reference, ours = make_pair(graph)
    compile_pair((reference, ours), compile_kwargs)
    assert isinstance(ours.optimizer, keras.optimizers.LossScaleOptimizer)
    h_ref, h_ours = fit_both((reference, ours), x, y, **fit_kwargs)
    assert_parity(reference, ours, h_ref, h_ours)
    keras.tree.map_structure(
        np.testing.assert_array_equal,
        reference.predict(x, verbose=0),
        ours.predict(x, verbose=0),
    )


def _subclassed_two_outputs(base):
    class TwoOutputs(base):
        """A subclassed model (no inputs/outputs given) returning a dict."""

        def __init__(self):
            super().__init__()
            self.one = keras.layers.Dense(3)
            self.two = keras.layers.Dense(3)

        def call(self, x):
            return {
                "y_one": self.one(x["x_one"]),
                "y_two": self.two(x["x_one"]),
            }

    return TwoOutputs()


def test_subclassed_dict_outputs_with_a_loss_dict_parity():
    # Keras trains it; fitcustom raised AttributeError (no output_names
    # before the model is called). The reference runs eagerly: with the
    # short last batch (20 = 8 + 8 + 4), that is where built-in fit()
    # logs each output's loss as the mean over samples (see above).
    rng = _rng()
    x = {"x_one": rng.normal(size=(20, 4)).astype("float32")}
    y = {
        "y_one": rng.normal(size=(20, 3)).astype("float32"),
        "y_two": rng.normal(size=(20, 3)).astype("float32"),
    }
    models = []
    for base in (keras.Model, fitcustom.TapeModel, keras.Model):
        model = _subclassed_two_outputs(base)
        model(x)
        models.append(model)
    for model in models[1:]:
        model.set_weights(models[0].get_weights())
    histories = []
    for model, weight in zip(models, (0.5, 0.5, 2.0)):
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss={"y_one": "mse", "y_two": "mse"},
            loss_weights={"y_one": 1.0, "y_two": weight},
            run_eagerly=model is models[0],
        )
        histories.append(
            model.fit(
                x, y, batch_size=8, epochs=2, shuffle=False, verbose=0
            ).history
        )
    assert_parity(models[0], models[1], histories[0], histories[1])
    # Control: other loss weights train other weights.
    assert max_abs_diff(models[2].get_weights(), models[1].get_weights()) > 1e-3


# ----------------------------------------------------------------------
# Found by Keras' own tests run on fitcustom (test_keras_suite.py)
# ----------------------------------------------------------------------


def _nested_outputs():
    x = keras.Input((3,), name="x")
    y1 = keras.layers.Dense(1, name="y1")(x)
    y2 = keras.layers.Dense(1, name="y2")(x)
    return x, {"a": (y1, y2), "b": {"b1": y1, "b2": y2}, "d": y2}


def test_nested_outputs_with_nested_targets_train_as_keras_does():
    """Dict targets of a model whose outputs nest (a dict of tuples and
    dicts) are matched by Keras' structure, not by output names: they
    were refused as 'not outputs of the model'."""
    reference, ours = make_pair(_nested_outputs)
    loss = {"a": ["mse", "mse"], "b": {"b1": "mse", "b2": "mae"}, "d": "mse"}
    compile_pair((reference, ours), dict(loss=loss))
    rng = _rng(11)
    x = rng.normal(size=(32, 3)).astype("float32")
    y1, y2 = rng.normal(size=(2, 32, 1)).astype("float32")
    y = {"a": (y1, y2), "b": {"b1": y1, "b2": y2}, "d": y2}
    h_ref, h_ours = fit_both((reference, ours), x, y)
    assert_parity(reference, ours, h_ref, h_ours)
    # Control: other targets train to other weights.
    other = {"a": (y2, y1), "b": {"b1": y2, "b2": y1}, "d": y1}
    _, again = make_pair(_nested_outputs)
    compile_pair((again,), dict(loss=loss))
    again.fit(x, other, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert max_abs_diff(again.get_weights(), ours.get_weights()) > 1e-3


@keras.saving.register_keras_serializable(package="test_structures")
class SuperInitBackbone(fitcustom.TapeModel):
    """Passes its graph to `super().__init__` (its own takes none)."""

    def __init__(self, **kwargs):
        inputs = keras.Input((3,))
        hidden = keras.layers.Dense(4, name="encoder")(inputs)
        super().__init__(inputs, keras.layers.Dense(2)(hidden), **kwargs)


def test_subclass_passing_its_graph_to_super_init_is_functional(tmp_path):
    """Keras' pattern `super().__init__(inputs, outputs)` in a subclass
    that is called without them: it failed inside Keras' Functional
    (`super(type, obj)`). It trains as keras.Model does, saves, loads and
    pickles."""
    import pickle

    from keras.src.models.functional import Functional

    keras.utils.set_random_seed(0)
    ours = SuperInitBackbone()
    assert isinstance(ours, Functional) and isinstance(ours, SuperInitBackbone)
    reference = keras.Model(ours.inputs, ours.outputs)
    reference = keras.models.clone_model(reference)
    reference.set_weights(ours.get_weights())
    compile_pair((reference, ours), dict(loss="mse"))
    rng = _rng(12)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    h_ref, h_ours = fit_both((reference, ours), x, y)
    assert_parity(reference, ours, h_ref, h_ours)
    path = tmp_path / "backbone.keras"
    ours.save(path)
    loaded = keras.saving.load_model(path)  # a registered class
    assert type(loaded).__name__ == "SuperInitBackbone"
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), ours.predict(x, verbose=0), atol=1e-6
    )
    copied = pickle.loads(pickle.dumps(ours))
    np.testing.assert_allclose(
        copied.predict(x, verbose=0), ours.predict(x, verbose=0), atol=1e-6
    )


@pytest.mark.parametrize("suffix", [".h5", ".hdf5"])
def test_legacy_hdf5_save_is_refused_before_writing(tmp_path, suffix):
    """Keras' legacy HDF5 file of a fitcustom model does not load back
    ("Unknown layer: 'TapeModel'"): refused, naming the formats that do."""
    inputs = keras.Input((3,))
    model = fitcustom.TapeModel(inputs, keras.layers.Dense(2)(inputs))
    path = tmp_path / f"model{suffix}"
    with pytest.raises(ValueError, match=r"model\.keras.*model\.weights\.h5"):
        model.save(path)
    assert not path.exists()
    model.save(tmp_path / "model.keras")  # the format that loads back
    model.save_weights(tmp_path / "model.weights.h5")
