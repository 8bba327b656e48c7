"""Preemption notices for `checkpoints.BackupAndRestore`: the signals it
takes, and what a notice does. The handler only notes the notice; the
callback asks at the end of each batch and epoch whether any worker got
one (a collective, so that all save at the same step), writes the backup
at that step, and exits with the notice's status.

`PreemptionHandling` is a mixin of `BackupAndRestore`: it uses the
callback's `model`, `backup_dir`, `progress` and `_save_at`.

May import: the ground floor (`distribute`).
"""

import signal
import sys
import threading
import time
import warnings

from fitcustom import distribute


def signal_numbers(signals):
    """`signals` (names such as "SIGTERM", numbers, or None) as a tuple
    of `signal.Signals`."""
    if signals is None:
        return ()
    if isinstance(signals, (str, int)):
        signals = (signals,)
    found = []
    for item in signals:
        try:
            found.append(
                signal.Signals[item.upper()]
                if isinstance(item, str)
                else signal.Signals(item)
            )
        except (KeyError, ValueError):
            raise ValueError(
                "preemption_signals takes signal names or numbers, e.g. "
                f'("SIGTERM", "SIGUSR1"). Received: {item!r}, which is not '
                "a signal of this system."
            ) from None
    if signal.SIGKILL in found:
        raise ValueError(
            "SIGKILL cannot be caught, so it cannot trigger a backup: "
            "remove it from preemption_signals (a SIGKILL costs the steps "
            "since the last backup; see save_freq)."
        )
    return tuple(found)


class PreemptionHandling:
    """What `BackupAndRestore` does with a preemption notice."""

    def _install_handlers(self):
        if not self.preemption_signals:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "BackupAndRestore can only handle preemption signals "
                "("
                + ", ".join(s.name for s in self.preemption_signals)
                + ") when fit() runs in the main thread; here it does not, "
                "so a notice stops the process without a backup.",
                stacklevel=2,
            )
            return
        for number in self.preemption_signals:
            self._previous_handlers[number] = signal.signal(
                number, self._on_signal
            )

    def _remove_handlers(self):
        handlers, self._previous_handlers = self._previous_handlers, {}
        for number, previous in handlers.items():
            signal.signal(
                number, signal.SIG_DFL if previous is None else previous
            )

    def _agreed_notice(self):
        """Whether this worker or any other got a notice. Every worker of
        a multi-worker cluster asks at the same batches (a collective),
        so all save at the same step and stop together."""
        if not self.preemption_signals:
            return False
        mine = 0 if self._notice is None else int(self._notice[0])
        strategy = self.model.distribute_strategy
        agreed = distribute.first_flag_of_any_worker(mine, strategy)
        if agreed and self._notice is None:  # another worker's notice
            self._notice = (signal.Signals(agreed), time.monotonic())
        return bool(agreed)

    def _on_signal(self, number, frame):
        # Only a flag: the backup is written between steps, never here.
        if self._notice is None:
            self._notice = (signal.Signals(number), time.monotonic())

    def _preempt(self, epoch, done, save=True):
        """Saves the backup at the step (`save`), then stops training,
        with a line on stderr, and exits (`exit_on_preemption`). A backup
        that cannot be written (a full disk) leaves the last one as it
        was: the line says so, and the exit status is the notice's all
        the same (the requeued job resumes from the last backup)."""
        number, received = self._notice
        self.preempted_by = number.name
        self.model.stop_training = True
        code = 128 + number if self.exit_code is None else self.exit_code
        what = (
            f"after {done} batches of epoch {epoch + 1}"
            if done
            else f"at the end of epoch {epoch}"
        )
        try:
            # The handlers stay until the backup is in place: a second
            # notice during the write only sets the flag again. (Ctrl-C
            # interrupts the write; the last backup stays as it was.)
            if save:
                try:
                    self._save_at(epoch, done)
                except OSError as e:
                    self._failed_notice_save(number, code, what, e)
                    return
        finally:
            self._notice = None
            self._remove_handlers()
        self._announce(
            f"BackupAndRestore: {number.name} received; the backup {what} "
            f"is in {self.backup_dir} ({time.monotonic() - received:.2f} s "
            "after the notice). "
            + (
                f"Exiting with status {code}; run the same command to resume."
                if self.exit_on_preemption
                else "Training stops; fit() with this callback resumes."
            ),
            code,
        )

    def _announce(self, line, code):
        """The one line on stderr of a notice; then the exit, with
        `exit_on_preemption`."""
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        if self.exit_on_preemption:
            raise SystemExit(code)

    def _failed_notice_save(self, number, code, what, error):
        last = self.progress(self.backup_dir)
        kept = (
            "no earlier backup exists"
            if last is None
            else f"the last backup (epoch {last[0] + 1}, {last[1]} batches "
            "done) is kept as it was"
            if last[1]
            else f"the last backup (end of epoch {last[0]}) is kept as it was"
        )
        line = (
            f"BackupAndRestore: {number.name} received, but the backup "
            f"{what} could not be written to {self.backup_dir} "
            f"({type(error).__name__}: {error}); {kept}."
        )
        message = line
        if self.exit_on_preemption:
            line += f" Exiting with status {code}."
        self._announce(line, code)
        raise OSError(error.errno, message) from error
