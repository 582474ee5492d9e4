#!/usr/bin/env bash
# run_ec2.sh: take an EC2 GPU instance from bare to trained, and survive spot reclaims.
#
#   ./run_ec2.sh setup                       venv + requirements; check GPUs, disk and shared memory
#   S3_DATA=s3://bucket/imagenet-1k ./run_ec2.sh data      ImageNet onto local disk, then train.py --check-data
#   S3_RUNS=s3://bucket/runs ./run_ec2.sh train [train.py flags]   torchrun on every GPU, in tmux, restarted
#                                                                  after a preemption or crash
#   ./run_ec2.sh backup                      sync OUT to S3_RUNS every BACKUP_MIN minutes while training runs
#   ./run_ec2.sh watch-spot                  on a spot interruption notice: SIGTERM the trainer, back up
#   ./run_ec2.sh status | stop
#
# Every setting is an environment variable; the defaults are below. DRY_RUN=1 prints each command instead.
set -euo pipefail

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
VENV=${VENV:-$REPO_DIR/.venv}                        # the virtual environment setup creates
DATA_DIR=${DATA_DIR:-/mnt/imagenet}                  # fast local disk (instance store or gp3)
S3_DATA=${S3_DATA:-}                                 # s3://bucket/imagenet-1k: an ImageFolder tree or the Kaggle zip
S3_RUNS=${S3_RUNS:-}                                 # s3://bucket/runs: where OUT is backed up
OUT=${OUT:-$REPO_DIR/runs/default}                   # train.py --out
BACKUP_MIN=${BACKUP_MIN:-10}                         # minutes between backups
HOURLY_USD=${HOURLY_USD:-0}                          # the instance's price, for status
SESSION=${SESSION:-resnet}                           # tmux session name
MAX_RESTARTS=${MAX_RESTARTS:-50}                     # the restart loop gives up after this many
RESTART_DELAY_S=${RESTART_DELAY_S:-10}               # pause before a restart
IMDS_URL=${IMDS_URL:-http://169.254.169.254}         # instance metadata service (tests point it at 127.0.0.1)
SPOT_POLL_S=${SPOT_POLL_S:-5}                        # seconds between spot notice polls
MIN_FREE_GB=${MIN_FREE_GB:-400}                      # ImageNet takes about 160 GB, its zip as much again
MIN_SHM_GB=${MIN_SHM_GB:-8}                          # DataLoader workers pass batches through /dev/shm
TRAIN_CMD=${TRAIN_CMD:-}                             # replaces "torchrun ... train.py" (tests use a stand-in)
AWS=${AWS:-aws}                                      # the AWS CLI
DRY_RUN=${DRY_RUN:-0}                                # 1: print the commands, run nothing

LOG=$OUT/train.log
PIDFILE=$OUT/trainer.pid

say() { printf 'run_ec2.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
run() { if [[ $DRY_RUN == 1 ]]; then printf '+ %s\n' "$*"; else "$@"; fi; }

usage() {
    case ${1:-} in
        setup) echo "setup: create $VENV, install requirements.txt (reusing a CUDA torch already on the system, as on a Deep Learning AMI), and check nvidia-smi, free disk (MIN_FREE_GB) and /dev/shm (MIN_SHM_GB)." ;;
        data) echo "data: aws s3 sync S3_DATA to DATA_DIR (or download and unzip the Kaggle zip found there), then train.py --check-data." ;;
        train) echo "train [train.py flags]: torchrun --nproc_per_node=<GPUs> train.py --data DATA_DIR --out OUT [flags] in tmux session SESSION (nohup without tmux), output to OUT/train.log; restarted after 'preempted' or 'crashed' (MAX_RESTARTS), stopped on done or on a config error. With no OUT/last.pt it first restores OUT from S3_RUNS." ;;
        backup) echo "backup: aws s3 sync OUT to S3_RUNS/<name of OUT> every BACKUP_MIN minutes while the trainer runs, and once more at the end." ;;
        watch-spot) echo "watch-spot: poll IMDS_URL (IMDSv2: token first) every SPOT_POLL_S seconds; on a spot interruption notice, SIGTERM the trainer (train.py checkpoints) and run a final backup." ;;
        status) echo "status: GPU use, the last log line, and epoch, top-1 and cost so far (HOURLY_USD)." ;;
        stop) echo "stop: SIGTERM the trainer (it checkpoints) and end the tmux session." ;;
        *) sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    esac
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU' || true; else echo 0; fi
}

python_bin() { if [[ -x $VENV/bin/python ]]; then echo "$VENV/bin/python"; else echo python3; fi; }

trainer_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

backup_once() {
    if [[ -z $S3_RUNS ]]; then say "S3_RUNS is not set: no backup"; return 0; fi
    run "$AWS" s3 sync "$OUT" "$S3_RUNS/$(basename "$OUT")" --only-show-errors --exclude "*.tmp"
}

cmd_setup() {
    local gpus free_gb shm_gb
    if [[ $DRY_RUN != 1 ]] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        say "a CUDA torch is installed system-wide (Deep Learning AMI): reusing it"
        run python3 -m venv --system-site-packages "$VENV"
        local reqs
        mapfile -t reqs < <(grep -v '^torch' "$REPO_DIR/requirements.txt")
        run "$VENV/bin/pip" install -q "${reqs[@]}"
    else
        run python3 -m venv "$VENV"
        run "$VENV/bin/pip" install -q -r "$REPO_DIR/requirements.txt"
    fi
    gpus=$(gpu_count)
    [[ $gpus -gt 0 ]] || say "warning: nvidia-smi finds no GPU; training would run on the CPU"
    say "GPUs: $gpus"
    free_gb=$(df -BG --output=avail "$(dirname "$DATA_DIR")" 2>/dev/null | tail -1 | tr -dc '0-9')
    [[ ${free_gb:-0} -ge $MIN_FREE_GB ]] || say "warning: ${free_gb:-?} GB free under $(dirname "$DATA_DIR"), want $MIN_FREE_GB"
    shm_gb=$(df -BG --output=size /dev/shm 2>/dev/null | tail -1 | tr -dc '0-9')
    [[ ${shm_gb:-0} -ge $MIN_SHM_GB ]] || say "warning: /dev/shm is ${shm_gb:-?} GB, want $MIN_SHM_GB for loader workers"
}

cmd_data() {
    [[ -n $S3_DATA ]] || die "set S3_DATA=s3://bucket/path of ImageNet (a train/ val/ tree or the Kaggle zip)"
    run mkdir -p "$DATA_DIR"
    local zip
    zip=$("$AWS" s3 ls "$S3_DATA/" 2>/dev/null | awk '/\.zip$/ {print $4; exit}' || true)
    if [[ -n $zip ]]; then
        run "$AWS" s3 cp "$S3_DATA/$zip" "$DATA_DIR/$zip" --only-show-errors
        run unzip -q -o "$DATA_DIR/$zip" -d "$DATA_DIR"
        run rm "$DATA_DIR/$zip"
    else
        run "$AWS" s3 sync "$S3_DATA" "$DATA_DIR" --only-show-errors
    fi
    run "$(python_bin)" "$REPO_DIR/train.py" --check-data --data "$DATA_DIR"
}

# The restart loop: train.py writes done / stopped / preempted / crashed / bad_input / diverged to OUT/status.
trainer_cmd() {  # the command line the loop runs, one word a line
    local gpus
    gpus=$(gpu_count)
    local words
    if [[ -n $TRAIN_CMD ]]; then read -r -a words <<< "$TRAIN_CMD"; printf '%s\n' "${words[@]}"; else
        printf '%s\n' torchrun "--nproc_per_node=$(( gpus > 0 ? gpus : 1 ))" "$REPO_DIR/train.py" --data "$DATA_DIR"
    fi
}

train_loop() {
    local restarts=0 code status cmd
    mapfile -t cmd < <(trainer_cmd)
    while true; do
        rm -f "$OUT/status"
        "${cmd[@]}" --out "$OUT" "$@" >> "$LOG" 2>&1 &
        echo $! > "$PIDFILE"
        code=0
        wait $! || code=$?
        status=$(cat "$OUT/status" 2>/dev/null || echo crashed)
        case $status in
            done|stopped) say "training $status"; return 0 ;;
            bad_input|diverged) say "training stopped: $status (exit $code); see $LOG"; return "$code" ;;
        esac
        restarts=$((restarts + 1))
        if [[ $restarts -gt $MAX_RESTARTS ]]; then say "giving up after $MAX_RESTARTS restarts"; return 1; fi
        say "training $status (exit $code): restart $restarts in ${RESTART_DELAY_S}s"
        sleep "$RESTART_DELAY_S"
    done
}

cmd_train() {
    run mkdir -p "$OUT"
    if [[ ! -f $OUT/last.pt && -n $S3_RUNS ]]; then
        say "no local checkpoint: restoring $S3_RUNS/$(basename "$OUT")"
        run "$AWS" s3 sync "$S3_RUNS/$(basename "$OUT")" "$OUT" --only-show-errors
    fi
    if [[ $DRY_RUN == 1 ]]; then
        local cmd
        mapfile -t cmd < <(trainer_cmd)
        run "${cmd[@]}" --out "$OUT" "$@"
    fi
    local self
    self=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
    if [[ ${FOREGROUND:-0} == 1 ]]; then
        train_loop "$@"
    elif command -v tmux >/dev/null 2>&1; then
        run tmux new-session -d -s "$SESSION" "FOREGROUND=1 $(printf '%q ' "$self" train "$@")"
        say "training in tmux session '$SESSION' (tmux attach -t $SESSION); log: $LOG"
    else
        run nohup env FOREGROUND=1 "$self" train "$@" >> "$OUT/loop.log" 2>&1 &
        say "training under nohup; log: $LOG"
    fi
}

training_active() {  # the trainer runs, or its restart loop's tmux session is still there
    [[ -n $(trainer_pid) ]] || { command -v tmux >/dev/null 2>&1 && tmux has-session -t "$SESSION" 2>/dev/null; }
}

cmd_backup() {
    while true; do
        backup_once
        training_active || break
        sleep $((BACKUP_MIN * 60))
    done
}

cmd_watch_spot() {
    local token code pid
    while true; do
        token=$(curl -s -f --noproxy '*' -X PUT "$IMDS_URL/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300" || true)
        code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
            "$IMDS_URL/latest/meta-data/spot/instance-action" || true)
        if [[ $code == 200 ]]; then
            say "spot interruption notice: stopping the trainer"
            pid=$(trainer_pid)
            if [[ -n $pid ]]; then
                run kill -TERM "$pid"
                for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            fi
            backup_once
            return 0
        fi
        sleep "$SPOT_POLL_S"
    done
}

cmd_status() {
    local pid
    pid=$(trainer_pid)
    echo "trainer: ${pid:+running (pid $pid)}${pid:-not running}; status file: $(cat "$OUT/status" 2>/dev/null || echo none)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader
    fi
    [[ -f $LOG ]] && echo "last log line: $(tail -n 1 "$LOG")"
    if [[ -f $OUT/log.jsonl ]]; then
        "$(python_bin)" - "$OUT/log.jsonl" "$HOURLY_USD" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
hours = sum(r["epoch_s"] for r in rows) / 3600
print(f"epoch {rows[-1]['epoch'] + 1}: val top-1 {rows[-1]['val_top1']:.2f}% (best {max(r['val_top1'] for r in rows):.2f}%), "
      f"{hours:.2f} h of training so far, ${hours * float(sys.argv[2]):.2f} at ${float(sys.argv[2]):.2f}/h")
PY
    fi
}

cmd_stop() {
    local pid
    pid=$(trainer_pid)
    if [[ -n $pid ]]; then run kill -TERM "$pid"; say "sent SIGTERM to the trainer (pid $pid): it checkpoints"; fi
    if command -v tmux >/dev/null 2>&1 && tmux has-session -t "$SESSION" 2>/dev/null; then
        # the loop sees 'preempted' and would restart: end its session once the trainer is gone
        if [[ -n $pid ]]; then for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done; fi
        run tmux kill-session -t "$SESSION"
    fi
}

main() {
    local sub=${1:-}
    [[ $# -gt 0 ]] && shift
    if [[ ${1:-} == --help || ${1:-} == -h ]]; then usage "$sub"; return 0; fi
    case $sub in
        setup) cmd_setup "$@" ;;
        data) cmd_data "$@" ;;
        train) cmd_train "$@" ;;
        backup) cmd_backup "$@" ;;
        watch-spot) cmd_watch_spot "$@" ;;
        status) cmd_status "$@" ;;
        stop) cmd_stop "$@" ;;
        -h|--help|help) usage ;;
        "") usage; return 2 ;;
        *) say "unknown subcommand '$sub'"; usage; return 2 ;;
    esac
}

main "$@"
