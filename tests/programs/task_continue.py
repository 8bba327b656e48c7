"""Saves, loads and continues a task model in fresh processes, for
`tests/task_harness.py`.

    python tests/programs/task_continue.py TESTS MODULE TASK MODE PATH OUT

`TESTS` is the `tests/` folder; `MODULE.TASK` is the `Task` there.
`MODE` "save": one epoch, save to `PATH`, one more epoch. "continue":
load the model saved at `PATH`, one more epoch. Both write the weights,
every optimizer's step count and the last epoch's logs to `OUT` (an
`.npz`). Grappler is off: its graph rewrites are not bitwise the same
from one process to the next (measured on the GAN: 2-4 runs in 24 ended
up to 3e-3 apart with it, 0 in 24 without).
"""

import importlib
import json
import sys

sys.path.insert(0, sys.argv[1])
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fitcustom  # noqa: E402, F401 (registers the classes)

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
from task_harness import optimizer_steps  # noqa: E402
from task_harness import weights_of  # noqa: E402

module, name, mode, path, out = sys.argv[2:7]
task = getattr(importlib.import_module(module), name)
if mode == "continue":
    model = keras.models.load_model(path, safe_mode=True)
else:
    model = task.build()
    task.fit(model, epochs=1)
    model.save(path)
history = task.fit(model, epochs=1)
weights = weights_of(model)
np.savez(
    out,
    *weights,
    weights=len(weights),
    steps=optimizer_steps(model),
    logs=json.dumps({k: v[-1] for k, v in sorted(history.items())}),
)
