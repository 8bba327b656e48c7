# Sourced by run.sh. forward COMMAND...: runs COMMAND and passes a
# preemption notice (SIGTERM, SIGUSR1) or Ctrl-C on to it, which bash alone
# would not do while it waits for a child; returns COMMAND's status (143
# after a SIGTERM at which fitcustom.BackupAndRestore saved and exited).
forward() {
    set -m  # the command gets its own process group, and keeps Ctrl-C
    "$@" &
    local child=$! status
    set +m
    trap 'kill -TERM "$child" 2>/dev/null' TERM
    trap 'kill -USR1 "$child" 2>/dev/null' USR1
    trap 'kill -INT "$child" 2>/dev/null' INT
    while :; do
        status=0
        wait "$child" || status=$?
        # A trapped signal ends `wait` early; go on until the command ends.
        kill -0 "$child" 2>/dev/null || break
    done
    trap - TERM USR1 INT
    return "$status"
}
