"""Files saved by an earlier fitcustom keep loading, predicting and
training the same (`tests/data/saved/`, written by
`tests/programs/make_saved_models.py` before the package was reorganised).
"""

import os

import keras
import numpy as np
import pytest

import fitcustom

DATA = os.path.join(os.path.dirname(__file__), "data", "saved")
KINDS = {
    "engine": fitcustom.TapeModel,
    "classifier": fitcustom.TapeClassifier,
    "gan": fitcustom.TapeGAN,
    "distiller": fitcustom.TapeDistiller,
}


def _load(kind):
    model = keras.saving.load_model(os.path.join(DATA, f"{kind}.keras"))
    arrays = np.load(os.path.join(DATA, f"{kind}.npz"))
    return model, arrays


def _continue(model, arrays, y=None):
    x = arrays["x"]
    if y is None and "y" in arrays:
        y = arrays["y"]
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


def _far(weights, arrays):
    return max(
        float(np.max(np.abs(w - arrays[f"after_{i}"])))
        for i, w in enumerate(weights)
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_an_earlier_file_loads_predicts_and_continues(kind):
    model, arrays = _load(kind)
    assert isinstance(model, KINDS[kind])
    assert type(model).__name__ == KINDS[kind].__name__
    if kind == "gan":
        seen = model.generate(8, seed=1)
    else:
        seen = model.predict(arrays["x"], verbose=0)
    np.testing.assert_allclose(seen, arrays["seen"], atol=1e-6, rtol=1e-6)
    weights = _continue(model, arrays)
    assert len(weights) == len([k for k in arrays if k.startswith("after_")])
    assert _far(weights, arrays) < 1e-5


def test_continuing_on_other_targets_fails_the_comparison():
    # Control: the comparison above sees a continued run that differs.
    model, arrays = _load("classifier")
    other = np.roll(arrays["y"], 1)
    assert _far(_continue(model, arrays, other), arrays) > 1e-3
