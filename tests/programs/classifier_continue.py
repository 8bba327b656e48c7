"""Loads a saved TapeClassifier in a fresh process and trains one more epoch.

    python tests/programs/classifier_continue.py MODEL DATA OUT

Loads `MODEL` (a `.keras` file), checks its compile settings survived,
fits one epoch on `x`, `y` from `DATA` (an `.npz`) and writes the weights
and the optimizer's iteration count to `OUT` (an `.npz`). Used by
`tests/test_classifier.py`.
"""

import sys

import keras
import numpy as np

import fitcustom  # registers the classes

path, data, out = sys.argv[1:4]
model = keras.models.load_model(path, safe_mode=True)
assert isinstance(model, fitcustom.TapeClassifier), type(model)
assert model.sam_rho == 0.05, model.sam_rho
assert model.loss.label_smoothing == 0.1, model.loss
assert model.gradient_transforms[0].max_norm == 2.0
assert model.optimizer.iterations.numpy() == 4
with np.load(data) as f:
    x, y = f["x"], f["y"]
model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
np.savez(
    out, *model.get_weights(), iterations=model.optimizer.iterations.numpy()
)
