#!/usr/bin/env bash
# srun_requeue.sh -- the body of the dpcap sbatch templates, which `exec` it from the repository root
# (so it is the batch shell and receives `--signal=B:USR1@…` and `scancel --batch` signals).
#
# Runs launch/train.py on every task of the allocation (srun: one task per GPU), forwards SIGUSR1 /
# SIGTERM to the tasks (they finish the current logical step, checkpoint and exit), then decides:
#   exit 3 (the privacy budget forbids the next step)   -> never requeue; the job fails with code 3
#   the run is finished (LAST step = train.steps)        -> exit 0
#   stopped early, progress made, no SIGTERM             -> scontrol requeue $SLURM_JOB_ID; the next
#                                                           attempt resumes from RUN_DIR/LAST
#   a crash, SIGTERM (scancel, pre-emption, time limit), no progress -> no requeue (exit code != 0)
# "Finished" is read from the run folder (launch/status.py), not from an exit code.
#
# Environment:
#   RUN_DIR          the run folder (required), passed as `run_dir=$RUN_DIR` (keep run_dir out of EXTRA)
#   CONFIG           YAML config (optional: EXTRA overrides alone may describe the run)
#   EXTRA            more `dpcap train` arguments, split on whitespace: key=value overrides first,
#                    then options such as --json (argparse rejects an override after an option)
#   PYTHON           interpreter (default .venv/bin/python when present, else python3)
#   SRUN_ARGS        more srun options, split on whitespace
#   OMP_NUM_THREADS  default 1 (one BLAS thread per task; data loading has its own workers)
set -uo pipefail

log() { printf '[dpcap-slurm %s] %s\n' "$(date +%T)" "$*"; }
: "${RUN_DIR:?set RUN_DIR to the run folder}"
[ -f launch/train.py ] || { log "run me from the dpcap repository root (no launch/train.py in $PWD)"; exit 2; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
JOB=${SLURM_JOB_ID:?not inside a slurm job}

# step steps done (JSON values) of RUN_DIR; "0 null false" before the run has started
run_status() { "$PYTHON" launch/status.py "$RUN_DIR" --fields step,steps,done 2>/dev/null; }

read -r before _ _ <<<"$(run_status)"
before=${before:-0}
log "job $JOB attempt $((${SLURM_RESTART_COUNT:-0} + 1)), nodes ${SLURM_JOB_NODELIST:-?}, ${SLURM_NTASKS:-1} tasks;" \
  "run $RUN_DIR at step $before"

received=""
srun_pid=""
forward() {
  received="$received $1"
  log "received SIG$1: forwarding it to the training tasks (they stop at the next step boundary)"
  if [ -n "$srun_pid" ]; then kill -s "$1" "$srun_pid" 2>/dev/null; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# srun runs in the background so that the traps above fire while it runs (bash defers traps until a
# foreground command returns). srun passes USR1/TERM on to every task.
# shellcheck disable=SC2086  # SRUN_ARGS and EXTRA are whitespace-separated lists on purpose
srun ${SRUN_ARGS:-} --label "$PYTHON" -u launch/train.py ${CONFIG:+"$CONFIG"} "run_dir=$RUN_DIR" ${EXTRA:-} &
srun_pid=$!
while :; do
  wait "$srun_pid"
  rc=$?
  # > 128: a trapped signal interrupted `wait`; srun is still running (or a zombie), so wait again
  if [ "$rc" -gt 128 ] && kill -0 "$srun_pid" 2>/dev/null; then continue; fi
  break
done
trap - USR1 TERM

read -r after steps finished <<<"$(run_status)"
log "srun exited with code $rc; run $RUN_DIR at step ${after:-?} of ${steps:-?}"
if [ "$rc" = 3 ]; then
  log "exit 3: the privacy budget forbids the next step - NOT requeueing"
  exit 3
fi
if [ "$rc" != 0 ] && [ "$rc" != 4 ]; then
  log "training failed (exit code $rc) - not requeueing"
  exit "$rc"
fi
if [ "$finished" = true ]; then
  log "run finished"
  exit 0
fi
case " $received " in
  *" TERM "*)
    log "SIGTERM: slurm is ending this job (scancel, pre-emption or time limit) - not requeueing from here"
    exit 4
    ;;
esac
if [ "${after:-0}" -le "$before" ]; then
  log "no step was taken in this attempt - not requeueing (it would loop); resubmit to resume from LAST"
  exit 4
fi
log "stopped at step $after of $steps: requeueing job $JOB; the next attempt resumes from $RUN_DIR/LAST"
if ! scontrol requeue "$JOB"; then
  log "scontrol requeue failed - resubmit by hand: the run resumes from $RUN_DIR/LAST"
  exit 4
fi
exit 0
