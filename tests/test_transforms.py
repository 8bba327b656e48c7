"""The gradient transforms on small arrays, without a model's `fit()`:
what each returns for known gradients, composition in order, and the
errors of bad arguments. (Their behaviour inside `fit()`, on one and two
replicas and under mixed precision, is in `test_engine.py`.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import fitcustom
from fitcustom.engine import transforms as transforms_lib


def _variables(*shapes):
    return [keras.Variable(np.zeros(s, "float32")) for s in shapes]


def _model():
    inputs = keras.Input((2,))
    hidden = keras.layers.Dense(3, name="backbone")(inputs)
    return fitcustom.TapeModel(
        inputs, keras.layers.Dense(1, name="head")(hidden)
    )


def test_clip_rescales_to_the_global_norm_over_all_tensors():
    grads = [tf.constant([3.0, 0.0]), tf.constant([[0.0], [4.0]])]  # norm 5
    clipped = fitcustom.ClipByGlobalNorm(1.0)(grads, _variables(2, (2, 1)))
    np.testing.assert_allclose(clipped[0], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped[1], [[0.0], [0.8]], rtol=1e-6)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in clipped))
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)


def test_clip_leaves_small_gradients_and_missing_ones_alone():
    grads = [tf.constant([0.3, 0.4]), None]
    clipped = fitcustom.ClipByGlobalNorm(1.0)(grads, _variables(2, 3))
    np.testing.assert_array_equal(clipped[0], np.float32([0.3, 0.4]))
    assert clipped[1] is None
    assert fitcustom.ClipByGlobalNorm(1.0)([None], _variables(1)) == [None]


def test_clip_keeps_the_gradients_dtype():
    grads = [tf.constant([30.0, 40.0], tf.float16)]
    (clipped,) = fitcustom.ClipByGlobalNorm(5.0)(grads, _variables(2))
    assert clipped.dtype == tf.float16
    np.testing.assert_allclose(clipped, [3.0, 4.0], rtol=1e-3)


def test_clip_of_the_sparse_gradient_of_an_embedding():
    # tape.gradient gives an Embedding's table IndexedSlices.
    embedding = keras.layers.Embedding(5, 2)
    embedding.build((None,))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(embedding(tf.constant([1, 3])) * 10.0)
    grads = tape.gradient(loss, embedding.trainable_weights)
    assert isinstance(grads[0], tf.IndexedSlices)
    (clipped,) = fitcustom.ClipByGlobalNorm(1.0)(
        grads, embedding.trainable_weights
    )
    dense = tf.convert_to_tensor(clipped).numpy()
    np.testing.assert_allclose(np.linalg.norm(dense), 1.0, rtol=1e-6)
    np.testing.assert_allclose(dense[[0, 2, 4]], 0.0)
    np.testing.assert_allclose(dense[1], [0.5, 0.5], rtol=1e-6)


def test_scale_by_layer_scales_freezes_and_passes_the_others():
    model = _model()
    variables = model.trainable_weights  # backbone kernel, bias, head ...
    grads = [tf.ones_like(v) for v in variables]
    scaled = fitcustom.ScaleByLayer({"backbone": 0.5})(grads, variables, model)
    frozen = fitcustom.ScaleByLayer({"head": 0.0})(grads, variables, model)
    for v, s, f in zip(variables, scaled, frozen):
        backbone = v.path.startswith("backbone")
        np.testing.assert_array_equal(s, np.full(v.shape, 0.5**backbone))
        np.testing.assert_array_equal(f, np.full(v.shape, float(backbone)))


def test_scale_by_layer_names_what_it_cannot_find():
    model = _model()
    grads = [tf.ones_like(v) for v in model.trainable_weights]
    with pytest.raises(ValueError, match=r"no layer named 'neck'.*'backbone'"):
        fitcustom.ScaleByLayer({"neck": 0.5})(
            grads, model.trainable_weights, model
        )
    with pytest.raises(ValueError, match="needs the model.*model=None"):
        fitcustom.ScaleByLayer({"head": 0.5})(grads, model.trainable_weights)


@pytest.mark.parametrize(
    "optimizer, scales, warning",
    [
        (keras.optimizers.Adam(), {"head": 0.1}, "normalises gradient"),
        (keras.optimizers.AdamW(weight_decay=0.1), {"head": 0.0}, "shrinks"),
        (keras.optimizers.SGD(), {"head": 0.1}, None),
        (keras.optimizers.Adam(), {"head": 0.0}, None),
    ],
    ids=["adam_partial", "adamw_frozen", "sgd_partial", "adam_frozen"],
)
def test_scale_by_layer_warns_where_the_optimizer_undoes_it(
    optimizer, scales, warning, recwarn
):
    fitcustom.ScaleByLayer(scales).check_optimizer(optimizer)
    messages = [str(w.message) for w in recwarn.list]
    if warning is None:
        assert not messages
    else:
        assert len(messages) == 1 and warning in messages[0]


def test_transforms_run_in_order():
    model = _model()
    variables = model.trainable_weights
    grads = [tf.fill(v.shape, 2.0) for v in variables]
    scale = fitcustom.ScaleByLayer({"backbone": 0.0})
    clip = fitcustom.ClipByGlobalNorm(1.0)
    scale_then_clip = transforms_lib.apply_transforms(
        [scale, clip], grads, variables, model
    )
    clip_then_scale = transforms_lib.apply_transforms(
        [clip, scale], grads, variables, model
    )
    norm = lambda gs: np.sqrt(sum(np.sum(np.square(g)) for g in gs))  # noqa
    # Clipping last: norm 1; clipping first, then zeroing part of it: < 1.
    np.testing.assert_allclose(norm(scale_then_clip), 1.0, rtol=1e-6)
    assert norm(clip_then_scale) < 0.9


def test_a_transform_returning_too_few_gradients_is_named():
    class DropOne(fitcustom.GradientTransform):
        def __call__(self, grads, variables, model=None):
            return grads[1:]

    with pytest.raises(ValueError, match=r"DropOne\(\) returned 1 gradients"):
        transforms_lib.apply_transforms(
            [DropOne()], [tf.ones(1), tf.ones(1)], _variables(1, 1)
        )


def test_the_base_class_says_what_to_implement():
    with pytest.raises(NotImplementedError, match="must implement __call__"):
        fitcustom.GradientTransform()([tf.ones(1)], _variables(1))


@pytest.mark.parametrize(
    "argument, message",
    [
        ("clip", "must be a list"),
        ([lambda g, v, m: g], "must be a fitcustom.GradientTransform"),
    ],
    ids=["string", "function"],
)
def test_bad_transform_lists_are_refused(argument, message):
    with pytest.raises(ValueError, match=message):
        transforms_lib.validate_transforms(argument)


def test_transform_lists_are_normalised():
    clip = fitcustom.ClipByGlobalNorm(2.0)
    assert transforms_lib.validate_transforms(None) == ()
    assert transforms_lib.validate_transforms(clip) == (clip,)
    assert transforms_lib.validate_transforms([clip]) == (clip,)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: fitcustom.ClipByGlobalNorm(0.0), "max_norm"),
        (lambda: fitcustom.ClipByGlobalNorm(float("nan")), "max_norm"),
        (lambda: fitcustom.ScaleByLayer({}), "non-empty dict"),
        (lambda: fitcustom.ScaleByLayer({1: 0.5}), "layer name"),
        (lambda: fitcustom.ScaleByLayer({"head": -1.0}), r"scales\['head'\]"),
    ],
    ids=["zero_norm", "nan_norm", "no_scales", "key", "negative"],
)
def test_bad_transform_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "transform",
    [fitcustom.ClipByGlobalNorm(0.5), fitcustom.ScaleByLayer({"head": 0.25})],
    ids=["clip", "scale"],
)
def test_transforms_round_trip_through_keras_serialization(transform):
    config = keras.saving.serialize_keras_object(transform)
    again = keras.saving.deserialize_keras_object(config)
    assert type(again) is type(transform)
    assert again.get_config() == transform.get_config()
    assert repr(again) == repr(transform)
