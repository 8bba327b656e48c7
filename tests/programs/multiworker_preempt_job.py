"""One worker of a MultiWorkerMirroredStrategy cluster that can be
preempted.

    python tests/programs/multiworker_preempt_job.py OUT BACKUP

Run by `scripts/launch_workers.py` from `tests/test_preemption.py`. Fits
the classifier of `multiworker_common.py` for 3 epochs with
`fitcustom.BackupAndRestore` in `OUT/backup` (BACKUP "shared") or
`OUT/backupINDEX` ("per_worker"), printing `at EPOCH BATCH` after each
batch (with a pause, so that a notice can arrive mid-epoch). With
`NOTICE=WORKER:EPOCH:BATCH:SIGNAL` in the environment, worker `WORKER`
sends itself `SIGNAL` after that batch (a notice that reaches one worker
only); with `KILL=WORKER:EPOCH:BATCH`, that worker SIGKILLs itself after
that batch (no notice). Writes `OUT/weightsINDEX.npz` at the end.
"""

import json
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import fitcustom

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multiworker_common import data  # noqa: E402
from multiworker_common import make_model  # noqa: E402


def main(out, backup):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    notice = os.environ.get("NOTICE", "").split(":")
    notice = notice[1:] if notice[0] == str(index) else None
    kill = os.environ.get("KILL", "").split(":")
    kill = tuple(map(int, kill[1:])) if kill[0] == str(index) else None

    class Report(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            print(f"at {self.epoch} {batch}", flush=True)
            if notice and (self.epoch, batch) == (
                int(notice[0]),
                int(notice[1]),
            ):
                os.kill(os.getpid(), signal.Signals[notice[2]])
            if kill == (self.epoch, batch):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    x, y = data()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    ds = ds.with_options(options)
    with strategy.scope():
        model = make_model("classifier")
    directory = "backup" if backup == "shared" else f"backup{index}"
    model.fit(
        ds,
        epochs=3,
        verbose=0,
        callbacks=[
            Report(),
            fitcustom.BackupAndRestore(os.path.join(out, directory)),
        ],
    )
    np.savez(os.path.join(out, f"weights{index}.npz"), *model.get_weights())


if __name__ == "__main__":
    main(*sys.argv[1:3])
