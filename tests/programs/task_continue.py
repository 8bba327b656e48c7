"""Saves, loads and continues a task model in fresh processes, or kills
and resumes it, for `tests/task_harness.py`.

    python tests/programs/task_continue.py TESTS MODULE TASK MODE PATH OUT [AT]

`TESTS` is the `tests/` folder; `MODULE.TASK` is the `Task` there.
`MODE` "save": one epoch, save to `PATH`, one more epoch. "continue":
load the model saved at `PATH`, one more epoch. "whole": two epochs.
"kill": two epochs with `fitcustom.BackupAndRestore(PATH, save_freq=2)`,
the process SIGKILLed by itself after batch `AT` of the first epoch.
"resume": the same `fit()` as "kill", uninterrupted. Each mode that
ends writes the weights, every optimizer's step count and the last
epoch's logs to `OUT` (an `.npz`). Grappler is off: its graph rewrites
are not bitwise the same from one process to the next (measured on the
GAN: 2-4 runs in 24 ended up to 3e-3 apart with it, 0 in 24 without).
"""

import importlib
import json
import os
import signal
import sys

sys.path.insert(0, sys.argv[1])
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fitcustom  # noqa: E402, F401 (registers the classes)

tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
from task_harness import optimizer_steps  # noqa: E402
from task_harness import weights_of  # noqa: E402


class KillSelf(keras.callbacks.Callback):
    """SIGKILL, as the kernel's OOM killer or a lost node ends a job:
    no Python code runs after it."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


module, name, mode, path, out = sys.argv[2:7]
task = getattr(importlib.import_module(module), name)
if mode == "continue":
    model = keras.models.load_model(path, safe_mode=True)
    history = task.fit(model, epochs=1)
elif mode == "save":
    model = task.build()
    task.fit(model, epochs=1)
    model.save(path)
    history = task.fit(model, epochs=1)
elif mode == "whole":
    model = task.build()
    history = task.fit(model, epochs=2)
else:
    model = task.build()
    callbacks = [fitcustom.BackupAndRestore(path, save_freq=2)]
    if mode == "kill":
        callbacks.append(KillSelf(int(sys.argv[7])))
    history = task.fit(model, epochs=2, callbacks=callbacks)
weights = weights_of(model)
np.savez(
    out,
    *weights,
    weights=len(weights),
    steps=optimizer_steps(model),
    logs=json.dumps({k: v[-1] for k, v in sorted(history.items())}),
)
