#!/usr/bin/env bash
# run_ec2.sh: from a laptop to a trained ResNet on EC2, and from a bare instance to a trained model, surviving
# spot reclaims and never paying for a run that cannot make progress.
#
# On the laptop (AWS CLI only):
#   ./run_ec2.sh check             what would stop a launch: the vCPU quota, the type's zones, the key pair, the
#                                  buckets' region (launch runs it first)
#   ./run_ec2.sh launch            this commit into S3, the run's IAM role, a security group, a spot or on-demand
#                                  instance whose user-data runs setup, data, train and finish; README "From zero"
#   ./run_ec2.sh list              this tool's instances in REGION: run, type, market, state, uptime, price
#   ./run_ec2.sh ssh | logs | status-remote | curves | terminate
#   ./run_ec2.sh tunnel [PORT ...] app.py's page and TensorBoard on the instance (started if need be), here
#   ./run_ec2.sh results           the run's results (weights, log, curves, reports, Grad-CAM, Space) into runs/RUN
#   ./run_ec2.sh resume            a new instance for a run whose instance was reclaimed: it continues from S3
#   ./run_ec2.sh prepare           once: ImageNet (from Kaggle, or S3_DATA) into checked tar shards beside S3_DATA;
#                                  PREPARE=1 launch runs it on a CPU instance
# On the instance:
#   ./run_ec2.sh setup             venv + requirements; check the commands, the GPUs and shared memory
#   ./run_ec2.sh data              the shards from S3 onto the instance store (DATA_DIR), while setup runs
#   ./run_ec2.sh train [flags]     torchrun train.py on every GPU, in tmux, restarted after a preemption or a crash
#                                  that made progress; starts the S3 backup, the spot watcher, the budget guard and
#                                  the watchdog
#   ./run_ec2.sh finish            after done (or the budget): evaluate.py, gradcam.py --worst 32, the Space, into S3
#   ./run_ec2.sh bench             bench.py on this GPU and these JPEGs: the projected hours and dollars
#   ./run_ec2.sh status | stop
#   ./run_ec2.sh end STAGE [CODE]  the end step of a launched instance: the final backup and OUT/ended.json
# On each node of a run on several (skypilot.yaml's steps; README "Several nodes with SkyPilot"):
#   ./run_ec2.sh data | setup      as above, on every node
#   ./run_ec2.sh restore           the run from S3_RUNS into OUT (train does it too, when OUT has no last.pt)
#   ./run_ec2.sh node [flags]      this node's part of the run, once, then an exit status for the launcher: 75 to
#                                  recover the run on new instances, anything else ends it
#
# What ends a launched instance: the end of its work, whatever it was (done, the budget, a stop, a config error, a
# diverged or hung or crashing trainer, a failed clone, setup or data), then the end step (the final backup and a
# record of why, ended.json, in S3_RUNS/RUN), then it shuts down, which terminates it; and MAX_HOURS after its
# launch at the latest. KEEP_ALIVE=1 at launch keeps it up after the end step (terminate it yourself).
#
# Every setting is an environment variable; the defaults are below. DRY_RUN=1 prints each command instead.
set -euo pipefail
# a tmux session or a nohup start of `train` gets the settings from a file only its user may read (train writes it):
# on a command line, an AWS key in the environment would show in `ps` and in tmux's record of the command
if [[ -n ${SETTINGS_FILE:-} && $(basename "$SETTINGS_FILE") == run_ec2-settings.* && -O $SETTINGS_FILE ]]; then
    # shellcheck source=/dev/null
    . "$SETTINGS_FILE"
    rm -f -- "$SETTINGS_FILE"
fi

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
VENV=${VENV:-$REPO_DIR/.venv}                        # the virtual environment setup creates
DATA_DIR=${DATA_DIR:-/mnt/imagenet}                  # the data on the instance: its instance store where it has one
S3_DATA=${S3_DATA:-}                                 # s3://bucket/imagenet-1k: an ImageFolder tree or the Kaggle zip
SHRINK=${SHRINK-320}                                 # prepare: the training images' side cap, px; empty: full size
SHRINK_BY=${SHRINK_BY:-shorter}                      # (shrinking cost no measurable top-1: BENCHMARKS.md) its side
SHARDS=${SHARDS:-$S3_DATA/shards${SHRINK:+-$SHRINK_BY$SHRINK}}  # prepare writes there; data stages those first
STAGE_JOBS=${STAGE_JOBS:-8}                          # data: shards streamed and extracted at a time
FORMAT_STORE=${FORMAT_STORE:-0}                      # 1: data may format an empty instance store (launch's user-data)
S3_RUNS=${S3_RUNS:-}                                 # s3://bucket/runs: where OUT is backed up
BACKUP_MIN=${BACKUP_MIN:-10}                         # minutes between backups
HOURLY_USD=${HOURLY_USD:-0}                          # the instance's price, for status, the budget and train.py's log
BUDGET_USD=${BUDGET_USD:-}                           # stop the run (cleanly) once its instances have cost this much
KEEP_ALIVE=${KEEP_ALIVE:-0}                          # 1: a launched instance stays up once its work has ended
END_BACKUP_MIN=${END_BACKUP_MIN:-30}                 # the end step retries the final backup this long, then ends
HANG_S=${HANG_S:-1800}                               # the watchdog: a trainer that writes no log line and no
                                                     # checkpoint this long, s (or 4x its longest silence), is hung
KILL_WAIT_S=${KILL_WAIT_S:-300}                      # a SIGTERM'd trainer gets this long, then SIGKILL
SESSION=${SESSION:-resnet}                           # tmux session name
MAX_RESTARTS=${MAX_RESTARTS:-50}                     # the restart loop gives up after this many
RESTART_DELAY_S=${RESTART_DELAY_S:-10}               # pause before a restart
IMDS_URL=${IMDS_URL:-http://169.254.169.254}         # instance metadata service (tests point it at 127.0.0.1)
SPOT_POLL_S=${SPOT_POLL_S:-5}                        # seconds between spot notice polls
BUDGET_POLL_S=${BUDGET_POLL_S:-60}                   # seconds between budget checks
HANG_POLL_S=${HANG_POLL_S:-30}                       # seconds between the watchdog's looks
MIN_SHM_GB=${MIN_SHM_GB:-8}                          # DataLoader workers pass batches through /dev/shm
TRAIN_CMD=${TRAIN_CMD:-}                             # replaces "torchrun ... train.py" (tests use a stand-in)
GPUS=${GPUS:-}                                       # the trainer's processes on this node; default: nvidia-smi's GPUs
# node: a run on several nodes (a launcher such as SkyPilot starts `node` on each; skypilot.yaml sets these)
NODES=${NODES:-1}                                    # the run's nodes
NODE_RANK=${NODE_RANK:-0}                            # this node's rank: 0 checkpoints, backs up, keeps the budget
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}                # node 0's address, torchrun's rendezvous
MASTER_PORT=${MASTER_PORT:-29500}
RECOVER_EXIT=75                                      # node's exit status that asks the launcher to recover the run
                                                     # on new instances (SkyPilot's recover_on_exit_codes); train.py's
                                                     # own for preempted
FINISH=${FINISH:-1}                                  # 0: no finish step (the results) after a launched run's end
AWS=${AWS:-$(command -v aws >/dev/null && echo aws || echo "$VENV/bin/aws")}  # the AWS CLI (setup puts one in VENV
                                                     # where there is none)
SUDO=${SUDO-sudo}                                    # privileged commands go through these (tests replace them;
                                                     # sudo ignores stand-ins on PATH); empty: no sudo
APT_GET=${APT_GET:-apt-get}
LSBLK=${LSBLK:-lsblk}                                # lists the disks, read only
WIPEFS=${WIPEFS:-wipefs}                             # run with -n: lists a device's signatures, changes nothing
MKFS=${MKFS:-mkfs.ext4}
MDADM=${MDADM:-mdadm}
MOUNT=${MOUNT:-mount}
FSTAB=${FSTAB:-/etc/fstab}
NEEDED=${NEEDED:-curl tmux unzip python3 aws}        # the commands setup checks for
KAGGLE=${KAGGLE:-$([[ -x $VENV/bin/kaggle ]] && echo "$VENV/bin/kaggle" || echo kaggle)}  # the Kaggle CLI
KAGGLE_PARAM=${KAGGLE_PARAM:-}                       # on prepare's instance: the SSM parameter with the Kaggle token
FINISH_MIN=${FINISH_MIN:-30}                         # the finish step's time limit (evaluation, Grad-CAM, Space)
JOURNAL=${JOURNAL:-journalctl -u resnet-run.service -n 40 --no-pager -o cat}  # the service's last lines, for the end
                                                     # step's record
DRY_RUN=${DRY_RUN:-0}                                # 1: print the commands, run nothing
# launch (on the laptop)
INSTANCE_TYPE=${INSTANCE_TYPE:-}                     # e.g. g6e.xlarge or p5.4xlarge: README "Choosing an instance"
SPOT=${SPOT:-1}                                      # 1: a spot instance, 0: on-demand
DISK_GB=${DISK_GB:-}                                 # gp3 root volume; default 100 GB (the venv, the checkpoints)
                                                     # where the data goes on the instance store, else 250 (it too)
PREPARE=${PREPARE:-0}                                # launch: 1 makes an instance (a CPU type) that runs prepare and
                                                     # terminates itself
PREPARE_HOURS=${PREPARE_HOURS:-6}                    # prepare's time limit on its instance
MAX_HOURS=${MAX_HOURS:-}                             # launch: the instance shuts down this long after its start,
                                                     # whatever it does; default 72 (PREPARE_HOURS + 1 for prepare),
                                                     # or BUDGET_USD / HOURLY_USD + 1 where that is less
PRICES=${PRICES:-$REPO_DIR/ec2_instances.json}       # on-demand prices (us-east-1's) and instance facts; bench.py's
REGION=${REGION:-${AWS_DEFAULT_REGION:-us-east-1}}
KEY_NAME=${KEY_NAME:-}                               # an EC2 key pair for ssh
KEY_FILE=${KEY_FILE:-$HOME/.ssh/$KEY_NAME.pem}
FROM_KAGGLE=${FROM_KAGGLE:-0}                        # prepare: 1 fetches ImageNet from Kaggle itself (its CLI)
KAGGLE_COMPETITION=${KAGGLE_COMPETITION:-imagenet-object-localization-challenge}  # ImageNet-1k's files on Kaggle
KEEP_ZIP=${KEEP_ZIP:-0}                              # prepare, FROM_KAGGLE: 1 keeps the competition's zip in S3_DATA
CHECK=${CHECK:-1}                                    # launch runs ./run_ec2.sh check first; 0 skips it
TRAIN_ARGS=${TRAIN_ARGS:-}                           # train.py flags for the launched run, e.g. "--epochs 16"
# the run's name: runs/RUN on the instance, S3_RUNS/RUN in S3; by default, what it trains, as train.py names its
# folder (<the data's folder name>-<arch>): an Imagenette try-out and the ImageNet run never share a folder
[[ $TRAIN_ARGS =~ --arch[=\ ]+([a-z0-9]+) ]] && ARCH=${BASH_REMATCH[1]} || ARCH=resnet50
if [[ -n ${OUT:-} ]]; then default_run=$(basename "$OUT"); else default_run=$(basename "${S3_DATA:-$DATA_DIR}")-$ARCH; fi
if [[ $PREPARE == 1 && -z ${OUT:-} ]]; then default_run=prepare-$(basename "${S3_DATA:-data}"); fi  # its tag, its record
RUN=${RUN:-$default_run}
OUT=${OUT:-$REPO_DIR/runs/$RUN}                      # train.py --out; its S3 copy is S3_RUNS/<name of OUT>
NAME_PREFIX=${NAME_PREFIX:-resnet-ec2}               # the IAM role, instance profile and security group
AMI_PARAM=${AMI_PARAM:-/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id}
MY_IP=${MY_IP:-}                                     # SSH is open to this address only; default: checkip.amazonaws.com
STATE_DIR=${STATE_DIR:-$REPO_DIR/.ec2}               # the laptop's record of launched instances, one file a run
REMOTE_USER=${REMOTE_USER:-ubuntu}                   # the AMI's login user
REMOTE_HOME=${REMOTE_HOME:-/home/$REMOTE_USER}       # where the instance clones the repo (REMOTE_HOME/resnet)

# what a tmux session, a helper and a launched instance get explicitly: a tmux server keeps its own environment
SETTINGS=(REPO_DIR VENV DATA_DIR S3_DATA S3_RUNS OUT BACKUP_MIN HOURLY_USD BUDGET_USD SESSION MAX_RESTARTS
          RESTART_DELAY_S IMDS_URL SPOT_POLL_S BUDGET_POLL_S HANG_S HANG_POLL_S KILL_WAIT_S MIN_SHM_GB TRAIN_CMD GPUS
          NODES NODE_RANK MASTER_ADDR MASTER_PORT AWS DRY_RUN PATH)
AWS_SETTINGS=(AWS_PROFILE AWS_REGION AWS_DEFAULT_REGION AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
              AWS_SESSION_TOKEN AWS_SHARED_CREDENTIALS_FILE AWS_CONFIG_FILE)
LOG=$OUT/train.log
PIDFILE=$OUT/trainer.pid

say() { printf 'run_ec2.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
run() { if [[ $DRY_RUN == 1 ]]; then printf '+ %s\n' "$*"; else "$@"; fi; }

usage() {
    case ${1:-} in
        setup) echo "setup: check the commands it needs (NEEDED; installed where missing on an instance, else named), create $VENV (reusing a CUDA torch already on the system), install requirements.txt (and tensorboard when TRAIN_ARGS ask), and check nvidia-smi, free disk (MIN_FREE_GB) and /dev/shm (MIN_SHM_GB)." ;;
        prepare) echo "prepare: once per dataset, ImageNet into tar shards: with FROM_KAGGLE=1 the competition's files from Kaggle (the Kaggle CLI; on a launched instance its token comes from an SSM SecureString parameter only the prepare role reads, deleted when prepare ends; KEEP_ZIP=1 also keeps the zip in S3_DATA), else S3_DATA (the Kaggle zip or a tree), into tar shards of about 1 GB under SHARDS (default S3_DATA/shards-<SHRINK_BY><SHRINK>, shards-shorter320; S3_DATA/shards with SHRINK= for full size), every image decoded once on the way, the training images shrunk to SHRINK px; resumes. On a laptop, or on a CPU instance: PREPARE=1 INSTANCE_TYPE=c7i.4xlarge ./run_ec2.sh launch." ;;
        data) echo "data: DATA_DIR onto the instance store (formatted only when launch's user-data sets FORMAT_STORE=1; striped over several disks; one the AMI mounted is used as it is), then the shards under S3_DATA streamed into it, checked against their sha256 (SHARDS where they fit, else the smallest that do); with no shards, the zip or the tree copied and train.py --check-data." ;;
        restore) echo "restore: when OUT holds no last.pt, the run's folder S3_RUNS/<name of OUT> into OUT (train does it first; on several nodes, every node, since a recovered cluster starts with nothing)." ;;
        node) echo "node [train.py flags]: one node's part of a run on NODES nodes (NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS; skypilot.yaml sets them from SkyPilot's variables), after restore: torchrun over the nodes once, in the foreground, no restart here; node 0 alone backs up, keeps BUDGET_USD over every node and cluster of the run (spent.json; HOURLY_USD is one node's price, else EC2's), watches for hangs, and runs finish and the end step; every node watches for its own spot notice. Node 0 exits $RECOVER_EXIT for the launcher to recover the run on new instances (a spot notice on any node, a preemption, a crash or hang after progress), else 0 (done, the budget), 1 (a crash with no progress), 2 (a config error), 3 (a diverged loss), which end it; the other nodes exit 0." ;;
        train) echo "train [train.py flags]: torchrun --nproc_per_node=<GPUs> train.py --data DATA_DIR --out OUT [flags] in tmux session SESSION (nohup without tmux), every setting passed in a file only you can read, output to OUT/train.log. Restarted after 'preempted', and after 'crashed' or 'hung' only when last.pt moved on since the start; ended by done, a config error, a diverged loss, BUDGET_USD, or ./run_ec2.sh stop. Starts the S3 backup and the spot watcher (S3_RUNS), the budget guard (BUDGET_USD, which needs HOURLY_USD) and the watchdog. With no OUT/last.pt it first restores OUT from S3_RUNS." ;;
        backup) echo "backup: aws s3 sync of a snapshot of OUT (hard links: a checkpoint replaced mid-upload arrives whole) to S3_RUNS/<name of OUT> every BACKUP_MIN minutes while training runs, and once more at the end; a failed sync is said and tried again at the next round, and OUT/backup.ok keeps the time of the last good one (train starts it)." ;;
        watchdog) echo "watchdog: a trainer that writes no log line and no checkpoint for HANG_S seconds (30 min), or 4 times its longest silence so far, is hung: SIGTERM, SIGKILL after KILL_WAIT_S, status 'hung', restarted only if it had made progress (train starts it)." ;;
        end) echo "end STAGE [CODE]: the end step of a launched instance (its service runs it, then shuts down unless KEEP_ALIVE=1): the final backup, retried for END_BACKUP_MIN minutes, then OUT/ended.json (why the work ended: the loop's word, or the stage that failed; the journal's last lines) copied to S3_RUNS/RUN (SHARDS for prepare)." ;;
        watch-spot) echo "watch-spot: poll IMDS_URL (IMDSv2) every SPOT_POLL_S seconds; on a spot interruption notice, SIGTERM the trainer (train.py checkpoints) and back up to S3_RUNS, which it requires (train starts it)." ;;
        budget) echo "budget: every BUDGET_POLL_S seconds, the money the run's instances have spent (HOURLY_USD, spent.json) against BUDGET_USD: a warning in the log when the projection to the last epoch passes it, a clean stop when the spending reaches it, which is final (train starts it; resume with a higher BUDGET_USD continues on a new instance)." ;;
        bench) echo "bench: python bench.py --device cuda on the JPEGs of DATA_DIR for this instance's type (IMDS), with HOURLY_USD: this GPU's and this machine's loader's rates, and the projected hours and dollars with them in place of the published rates." ;;
        status) echo "status: GPU use, helpers that are no longer running, the last good backup, the last log line, epoch and top-1, why the loop ended, and the cost since the instance's launch (IMDS; uptime as the fallback) with the projection to the last epoch and BUDGET_USD." ;;
        stop) echo "stop: end the run for good: SIGTERM the trainer (it checkpoints) and the restart loop ends; a launched instance then runs its end step and shuts down (unless KEEP_ALIVE=1). resume, on the laptop, continues the run on a new instance." ;;
        launch) echo "launch: from INSTANCE_TYPE, SPOT, DISK_GB, S3_DATA, S3_RUNS, KEY_NAME, REGION (and RUN, TRAIN_ARGS, HOURLY_USD, BUDGET_USD, MAX_HOURS, KEEP_ALIVE; PREPARE, FROM_KAGGLE): check first (CHECK=0 skips it), this checkout's commit as a git archive into S3 beside the run (uncommitted changes are refused), the Deep Learning AMI from SSM (AMI_PARAM), the run's own IAM role (reads S3_DATA, writes S3_RUNS/RUN only), a security group open to MY_IP's SSH only, the instance (IMDSv2 only), and user-data that runs setup, data and train on every boot (systemd). Refused while an instance of RUN runs. The price it counts: HOURLY_USD, else EC2's current spot price, else ec2_instances.json's on-demand one. The instance ends itself once its work ends (the end step, then a shutdown) and MAX_HOURS after launch at the latest; KEEP_ALIVE=1 keeps it up after its work." ;;
        resume) echo "resume: launch a new instance for RUN, which must have a last.pt in S3_RUNS/RUN: train restores it and continues." ;;
        check) echo "check: before any instance is paid for, for INSTANCE_TYPE and SPOT's market in REGION: the vCPU quota (Service Quotas; the codes in ec2_instances.json) less what runs already (for NODES of the type, a run on several nodes), the zones that offer the type, the key pair KEY_NAME, and that the buckets of S3_DATA and S3_RUNS are in REGION and readable; each failure is one line with its fix. launch runs it first (CHECK=0 skips it)." ;;
        list) echo "list: this tool's instances in REGION (tagged made-by=run_ec2.sh): run, type, market, state, uptime, the price counted, the commit." ;;
        curves) echo "curves: the run's current curves.png (over SSH, else from S3_RUNS) into runs/RUN/curves.png here, and says where." ;;
        finish) echo "finish: after the run ended done, or stopped at its budget: evaluate.py (top-1, top-5, per class, predictions), gradcam.py --worst 32 (grid and HTML), app.py --export-space with photos of the val set, and a weights-only best.pt, into OUT/results, then backed up to S3_RUNS/RUN; FINISH_MIN minutes at most. A launched instance runs it before its end step; by hand (KEEP_ALIVE=1), it runs wherever OUT, DATA_DIR and S3_RUNS are set." ;;
        results) echo "results: S3_RUNS/RUN's results into runs/RUN here: a weights-only best.pt, log.jsonl, curves.png, the evaluation's reports, the Grad-CAM dump, the Space, why the instance ended; then the run's summary. Refuses a runs/RUN that holds another run. Then python app.py --checkpoint runs/RUN/best.pt." ;;
        ssh|logs|status-remote|terminate) echo "ssh | logs | status-remote | terminate: log in to RUN's instance, print its last log lines (over SSH, else from S3_RUNS), run status there (with its own settings), or terminate it at once (no end step) and, once it is gone, remove the run's IAM role and profile." ;;
        tunnel) echo "tunnel [PORT ...]: forward local ports (default 7860 and 6006) to RUN's instance's 127.0.0.1 over SSH: app.py's page (on the run's best.pt) and TensorBoard, started there first when they are not running; they listen on 127.0.0.1 only, and the security group stays SSH-only." ;;
        *) sed -n '2,/^# Every setting/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    esac
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU' || true; else echo 0; fi
}

python_bin() { if [[ -x $VENV/bin/python ]]; then echo "$VENV/bin/python"; else echo python3; fi; }

# A pid file holds "PID START BOOT": the process's start time (/proc/PID/stat) and this boot's id, so that a pid file
# that came back from S3 with the run (written on another instance), or that outlived its process, never names a
# process to signal: pids are reused, and another instance's pid is some other program here.
proc_start() {  # the start time of process $1, in clock ticks after boot (field 22 of /proc/PID/stat)
    local stat fields
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    read -r -a fields <<< "${stat##*) }"
    echo "${fields[19]}"
}
boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo none; }

write_pid() {  # write_pid FILE PID
    mkdir -p "$(dirname "$1")" && echo "$2 $(proc_start "$2" || echo -) $(boot_id)" > "$1"
}

own_pid() {  # the pid in FILE, when it is that very process, alive; else nothing
    local pid start boot
    [[ -f $1 ]] && read -r pid start boot < "$1" || return 0
    [[ -n ${pid:-} && -n ${boot:-} && $boot == "$(boot_id)" && $start == "$(proc_start "$pid" || echo gone)" ]] \
        && kill -0 "$pid" 2>/dev/null && echo "$pid"
    return 0
}

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

trainer_pid() { own_pid "$PIDFILE"; }

process_tree() {  # pid $1 and every process below it (torchrun's ranks run in sessions of their own, their loader
    # workers too, so a process group would not reach them)
    local f stat fields
    echo "$1"
    for f in /proc/[0-9]*/stat; do
        stat=$(cat "$f" 2>/dev/null) || continue
        read -r -a fields <<< "${stat##*) }"
        if [[ ${fields[1]} == "$1" ]]; then process_tree "${f//[^0-9]/}"; fi
    done
}

stop_trainer() {  # SIGTERM (train.py checkpoints after its step; torchrun passes it on to the ranks), then, after
    # KILL_WAIT_S, SIGKILL to the trainer and every process below it
    local pid=$1 tree
    run kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq "$KILL_WAIT_S"); do alive "$pid" || return 0; sleep 1; done
    tree=$(process_tree "$pid")
    say "the trainer (pid $pid) still runs ${KILL_WAIT_S}s after SIGTERM: SIGKILL to it and its processes (${tree//$'\n'/ })"
    # shellcheck disable=SC2086
    run kill -KILL $tree 2>/dev/null || true
}

backup_once() {  # OUT to S3_RUNS/<name of OUT> as it is at this moment: a sync of hard links to its files, so that a
    # file that train.py replaces mid-upload (last.pt, by os.replace) reaches S3 whole, the old one or the new one,
    # never parts of both (the CLI opens a file again for each part of a multipart upload)
    if [[ -z $S3_RUNS ]]; then say "S3_RUNS is not set: no backup"; return 0; fi
    # only node 0 uploads: it alone writes the checkpoints, and another node's OUT (an older restored copy) synced
    # over it could put an older last.pt in S3 than the one node 0 saved
    if [[ $NODE_RANK != 0 ]]; then return 0; fi
    local dest snap code=0
    dest=$S3_RUNS/$(basename "$OUT")
    if [[ $DRY_RUN == 1 ]]; then run "$AWS" s3 sync "$OUT" "$dest" --only-show-errors --exclude "*.tmp" --exclude "*.pid"; return 0; fi
    snap=$(mktemp -d "$(dirname "$OUT")/.backup-$(basename "$OUT").XXXXXX") || return 1
    cp -al "$OUT/." "$snap/" 2>/dev/null || cp -a "$OUT/." "$snap/" || code=$?  # links; a copy where links fail
    if [[ $code == 0 ]]; then
        "$AWS" s3 sync "$snap" "$dest" --only-show-errors --exclude "*.tmp" --exclude "*.pid" || code=$?
    fi
    rm -rf -- "$snap"  # this call's own links (OUT's files stay)
    return "$code"
}

ensure_dir() {  # mkdir -p, with sudo where the user may not write (/mnt belongs to root on Ubuntu and the DLAMI)
    local dir=$1 parent=$1
    while [[ ! -e $parent ]]; do parent=$(dirname "$parent"); done
    if [[ -d $dir && -w $dir ]] || { [[ ! -e $dir ]] && [[ -w $parent ]]; }; then
        run mkdir -p "$dir"
    else
        run sudo mkdir -p "$dir"
        run sudo chown "$(id -u):$(id -g)" "$dir"
    fi
}

settings_env() {  # `export NAME=value` for every setting that is set, one a line, for a shell to read
    local name
    for name in "${SETTINGS[@]}" "${AWS_SETTINGS[@]}"; do
        if [[ -n ${!name+x} ]]; then printf 'export %s=%q\n' "$name" "${!name}"; fi
    done
}

# -----------------------------------------------------------------------------
# on the instance

on_ec2() { [[ -n $(imds_get meta-data/instance-id) ]]; }

check_commands() {  # every command the steps need: installed where missing on an instance, else named with the fix
    local cmd missing=() packages=()
    for cmd in $NEEDED; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    for cmd in "${missing[@]}"; do
        case $cmd in aws) ;; python3) packages+=(python3-venv) ;; *) packages+=("$cmd") ;; esac
    done
    if ! on_ec2; then
        local fix=""
        [[ ${#packages[@]} -eq 0 ]] || fix="sudo apt-get install -y ${packages[*]}"
        [[ " ${missing[*]} " != *" aws "* ]] || fix="${fix:+$fix; }pip install awscli"
        die "missing: ${missing[*]}; install them (on Debian or Ubuntu: $fix), then run setup again"
    fi
    say "installing what this instance lacks: ${missing[*]}"
    if [[ ${#packages[@]} -gt 0 ]]; then run $SUDO "$APT_GET" install -y -q "${packages[@]}"; fi
    # aws: into the venv (Ubuntu 24.04 packages no AWS CLI); AWS falls back to VENV's
}

cmd_setup() {
    local gpus shm_gb
    mark setup_start
    check_commands
    # a CUDA torch on the system (the Deep Learning AMI's) is reused: probed once, when the venv is made
    if [[ $DRY_RUN != 1 && ! -x $VENV/bin/python ]] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        say "a CUDA torch is installed system-wide: reusing it"
        run python3 -m venv --system-site-packages "$VENV"
    fi
    if grep -qs '^include-system-site-packages = true' "$VENV/pyvenv.cfg"; then
        local reqs
        mapfile -t reqs < <(grep -v '^torch' "$REPO_DIR/requirements.txt")
        run "$VENV/bin/pip" install -q "${reqs[@]}"
    else
        [[ -x $VENV/bin/python ]] || run python3 -m venv "$VENV"
        if [[ $(gpu_count) == 0 ]]; then  # a CPU instance (prepare's): PyTorch's CPU wheels, not 5 GB of CUDA
            local pins
            mapfile -t pins < <(grep '^torch' "$REPO_DIR/requirements.txt")
            run "$VENV/bin/pip" install -q --index-url https://download.pytorch.org/whl/cpu "${pins[@]}"
        fi
        run "$VENV/bin/pip" install -q -r "$REPO_DIR/requirements.txt"
    fi
    if ! command -v aws >/dev/null 2>&1 && [[ " $NEEDED " == *" aws "* ]]; then run "$VENV/bin/pip" install -q awscli; fi
    if [[ " $TRAIN_ARGS " == *" --tensorboard "* ]]; then run "$VENV/bin/pip" install -q tensorboard; fi
    if [[ $FROM_KAGGLE == 1 ]]; then run "$VENV/bin/pip" install -q kaggle; fi  # prepare's download
    gpus=$(gpu_count)
    [[ $gpus -gt 0 ]] || say "warning: nvidia-smi finds no GPU; training would run on the CPU"
    say "GPUs: $gpus"
    shm_gb=$(df -BG --output=size /dev/shm 2>/dev/null | tail -1 | tr -dc '0-9')
    [[ ${shm_gb:-0} -ge $MIN_SHM_GB ]] || say "warning: /dev/shm is ${shm_gb:-?} GB, want $MIN_SHM_GB for loader workers"
    mark setup_end
}

# -----------------------------------------------------------------------------
# the data: prepared once into shards in S3, staged onto the instance store

mark() {  # a moment of this start (boot, setup, data, train) into OUT/timeline.jsonl, which travels with the run
    [[ $DRY_RUN == 1 ]] && return 0
    mkdir -p "$OUT" && printf '{"event": "%s", "t": %s}\n' "$1" "$(date +%s)" >> "$OUT/timeline.jsonl"
}

cmd_prepare() {  # once per dataset, on a laptop or (better) a CPU instance in the bucket's region: PREPARE=1 launch
    [[ -n $S3_DATA ]] || die "set S3_DATA=s3://bucket/path: the shards go beside it (and it holds ImageNet, a train/ val/ tree or the Kaggle zip, unless FROM_KAGGLE=1)"
    local flags=() src=$S3_DATA
    [[ -z $SHRINK ]] || flags+=(--shrink "$SHRINK" --shrink-by "$SHRINK_BY")
    if [[ $FROM_KAGGLE == 1 ]]; then  # the competition's files straight from Kaggle onto this machine: no laptop
        local dir=${PREPARE_SRC:-$HOME/kaggle}
        if [[ -n $KAGGLE_PARAM ]]; then  # on prepare's instance: the token launch put in SSM, in a file of its own
            export KAGGLE_CONFIG_DIR=$HOME/.kaggle-run_ec2
            (umask 077 && mkdir -p "$KAGGLE_CONFIG_DIR" && "$AWS" ssm get-parameter --name "$KAGGLE_PARAM" --with-decryption \
                --query Parameter.Value --output text > "$KAGGLE_CONFIG_DIR/kaggle.json") \
                || die "could not read the Kaggle token from SSM ($KAGGLE_PARAM): launch prepare again (PREPARE=1 FROM_KAGGLE=1 ./run_ec2.sh launch)"
        fi
        run mkdir -p "$dir"
        say "downloading $KAGGLE_COMPETITION from Kaggle into $dir (about 155 GB)"
        run "$KAGGLE" competitions download "$KAGGLE_COMPETITION" -p "$dir"
        src=$dir/$KAGGLE_COMPETITION.zip
    fi
    run "$(python_bin)" "$REPO_DIR/shards.py" pack "$src" "$SHARDS" "${flags[@]}" ${PREPARE_SRC:+--scratch "$PREPARE_SRC"}
    if [[ $FROM_KAGGLE == 1 && $KEEP_ZIP == 1 ]]; then run "$AWS" s3 cp "$src" "$S3_DATA/" --only-show-errors; fi
}

kaggle_ready() {  # on the laptop, before prepare's instance is paid for: the Kaggle CLI, a token that works, the
    # competition's rules accepted; each failure one line with its fix. Prints the token (kaggle.json's text).
    local out dir=${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}
    command -v "$KAGGLE" >/dev/null 2>&1 || die "FROM_KAGGLE=1 needs the Kaggle CLI here, to check your token first: pip install kaggle"
    if ! out=$("$KAGGLE" competitions files "$KAGGLE_COMPETITION" 2>&1); then
        case $out in
            *kaggle.json*|*"Could not find"*|*credentials*)
                die "no Kaggle token: on kaggle.com, Settings -> API -> Create New Token, then save kaggle.json as $dir/kaggle.json (chmod 600)" ;;
            *401*|*Unauthorized*)
                die "Kaggle refuses the token in $dir/kaggle.json (401): make a new one (kaggle.com, Settings -> API -> Create New Token)" ;;
            *403*|*Forbidden*|*rules*)
                die "this Kaggle account has not accepted the competition's rules (403): accept them at https://www.kaggle.com/competitions/$KAGGLE_COMPETITION/rules, then launch again" ;;
            *) die "the Kaggle CLI failed: $(tail -n 1 <<< "$out")" ;;
        esac
    fi
    if [[ -f $dir/kaggle.json ]]; then cat "$dir/kaggle.json"
    elif [[ -n ${KAGGLE_USERNAME:-} && -n ${KAGGLE_KEY:-} ]]; then printf '{"username": "%s", "key": "%s"}\n' "$KAGGLE_USERNAME" "$KAGGLE_KEY"
    else die "the Kaggle CLI works, but no $dir/kaggle.json nor KAGGLE_USERNAME and KAGGLE_KEY to give the instance"; fi
}

store_disks() {  # NAME SIZE MOUNTPOINT of each instance store disk (AWS names their model so), one a line
    "$LSBLK" -b -d -n -P -o NAME,MODEL,SIZE,MOUNTPOINT,TYPE 2>/dev/null \
        | awk -F'"' '$4 == "Amazon EC2 NVMe Instance Storage" && $10 == "disk" {print "/dev/" $2, $6, ($8 == "" ? "-" : $8)}'
}

mounted_under() {  # the mount point of a device or of anything built on it (a partition, a RAID of ours), or nothing
    "$LSBLK" -n -o MOUNTPOINT "$1" 2>/dev/null | awk 'NF {print; exit}'
}

store_capacity() { store_disks | awk '{sum += $2} END {printf "%.0f\n", sum}'; }

manifest_bytes() {  # the bytes of the shards under prefix $1, or nothing when they are not complete
    "$AWS" s3 cp "$1/manifest.json" - 2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes"])' 2>/dev/null || true
}

pick_shards() {  # "prefix bytes" of the complete shards under S3_DATA to stage on a disk of $1 bytes: SHARDS (the
    # ones prepare makes by default) when they fit, else the smallest that do, else the smallest; none: nothing
    local fit=$1 name bytes mine="" small="" small_bytes=""
    while read -r name; do
        bytes=$(manifest_bytes "$S3_DATA/$name")
        [[ -n $bytes ]] || continue
        if [[ $S3_DATA/$name == "${SHARDS%/}" ]]; then mine=$bytes; fi
        if [[ -z $small_bytes ]] || (( bytes < small_bytes )); then small=$name; small_bytes=$bytes; fi
    done < <("$AWS" s3 ls "$S3_DATA/" 2>/dev/null | awk '$1 == "PRE" && $2 ~ /^shards/ {sub("/$", "", $2); print $2}')
    if [[ -n $mine ]] && (( mine < fit )); then echo "${SHARDS%/} $mine"; elif [[ -n $small ]]; then echo "$S3_DATA/$small $small_bytes"; fi
}

free_bytes() { df -B1 --output=avail "$1" 2>/dev/null | tail -1 | tr -dc '0-9'; }

use_store() {  # put DATA_DIR on the instance store; says what it did; 1 when the data stays on the root volume
    local need=$1 disks dev mp devices=() capacity target
    if [[ -L $DATA_DIR ]] || mountpoint -q "$DATA_DIR" 2>/dev/null; then
        say "DATA_DIR $DATA_DIR is on the instance store already (an earlier data, or fstab after a reboot)"
        return 0
    fi
    disks=$(store_disks)
    if [[ -z $disks ]]; then say "no instance store on this instance: DATA_DIR stays on the root volume (EBS)"; return 1; fi
    while read -r dev _ _; do
        mp=$(mounted_under "$dev")
        if [[ -n $mp ]]; then  # the AMI's own mount (the DLAMI mounts it at /opt/dlami/nvme): used as it is
            [[ ! -e $DATA_DIR ]] || $SUDO rmdir "$DATA_DIR" 2>/dev/null \
                || die "$DATA_DIR exists and is not empty: nothing is linked over it; move it away or set DATA_DIR"
            run $SUDO mkdir -p "$mp/imagenet"
            run $SUDO chown "$(id -u):$(id -g)" "$mp/imagenet"
            run $SUDO ln -s "$mp/imagenet" "$DATA_DIR"
            say "the instance store is mounted at $mp already: DATA_DIR $DATA_DIR -> $mp/imagenet"
            return 0
        fi
        devices+=("$dev")
    done <<< "$disks"
    capacity=$(store_capacity)
    if (( capacity < need )); then
        say "the instance store (${devices[*]}) holds $((capacity / 1000000000)) GB, the data needs $((need / 1000000000)): DATA_DIR stays on the root volume (EBS)"
        return 1
    fi
    if [[ $FORMAT_STORE != 1 ]]; then  # formatting is launch's to ask for: a data run by hand (or a test) never does
        say "the instance store (${devices[*]}) is not formatted, and only launch's user-data formats it (FORMAT_STORE=1): DATA_DIR stays on the root volume"
        return 1
    fi
    for dev in "${devices[@]}"; do  # empty disks only: no filesystem, partition table, RAID or LVM signature
        if [[ -n $($SUDO "$WIPEFS" -n "$dev" 2>&1 | grep -v '^$' || true) ]] || [[ $("$LSBLK" -n -o NAME "$dev" | wc -l) -gt 1 ]]; then
            die "$dev carries a signature (wipefs -n $dev lists it) or partitions: it is not formatted; DATA_DIR stays where it is, set it by hand"
        fi
    done
    ensure_dir "$DATA_DIR"
    [[ -z $(ls -A "$DATA_DIR" 2>/dev/null) ]] || die "$DATA_DIR is not empty: the instance store is not mounted over it; move its files away or set DATA_DIR"
    target=${devices[0]}
    if [[ ${#devices[@]} -gt 1 ]]; then
        target=/dev/md/resnet-data
        run $SUDO "$MDADM" --create "$target" --level=0 --raid-devices="${#devices[@]}" "${devices[@]}" --run
    fi
    run $SUDO "$MKFS" -q -L resnet-data "$target"
    run $SUDO "$MOUNT" -o noatime "$target" "$DATA_DIR"
    run $SUDO chown "$(id -u):$(id -g)" "$DATA_DIR"
    if ! grep -qs "^LABEL=resnet-data " "$FSTAB"; then  # mounted again after a reboot; nofail: a new instance boots
        if [[ $DRY_RUN == 1 ]]; then echo "+ append to $FSTAB: LABEL=resnet-data $DATA_DIR ext4 defaults,noatime,nofail 0 2"
        else echo "LABEL=resnet-data $DATA_DIR ext4 defaults,noatime,nofail 0 2" | $SUDO tee -a "$FSTAB" >/dev/null; fi
    fi
    say "the instance store (${devices[*]}$([[ ${#devices[@]} -gt 1 ]] && echo ", RAID 0")) formatted and mounted at DATA_DIR $DATA_DIR"
}

cmd_data() {
    [[ -n $S3_DATA ]] || die "set S3_DATA=s3://bucket/path of ImageNet (a train/ val/ tree or the Kaggle zip)"
    mark data_start
    local picked prefix bytes fit
    fit=$(store_capacity)
    [[ $fit -gt 0 ]] || fit=$(free_bytes "$(dirname "$DATA_DIR")")
    picked=$(pick_shards "$(( ${fit:-0} * 9 / 10 ))")  # a tenth spare: the filesystem, the marks
    if [[ -n $picked ]]; then
        read -r prefix bytes <<< "$picked"
        use_store "$bytes" || ensure_dir "$DATA_DIR"
        say "staging $prefix ($((bytes / 1000000000)) GB) into $DATA_DIR"
        run python3 "$REPO_DIR/shards.py" unpack "$prefix" "$DATA_DIR" --jobs "$STAGE_JOBS"
        mark data_end
        return 0
    fi
    # no shards (./run_ec2.sh prepare makes them once): the slow way, the zip or the tree onto the root volume
    say "no shards in $S3_DATA (run ./run_ec2.sh prepare once: starts then take minutes): copying the data itself"
    ensure_dir "$DATA_DIR"
    local zip
    zip=$("$AWS" s3 ls "$S3_DATA/" 2>/dev/null | awk '/\.zip$/ {print $4; exit}' || true)
    if [[ -n $zip ]]; then
        run "$AWS" s3 cp "$S3_DATA/$zip" "$DATA_DIR/$zip" --only-show-errors
        run unzip -q -o "$DATA_DIR/$zip" -d "$DATA_DIR"
        run rm "$DATA_DIR/$zip"
    else
        run "$AWS" s3 sync "$S3_DATA" "$DATA_DIR" --only-show-errors --exclude "shards*"
    fi
    until [[ $DRY_RUN == 1 || -x $VENV/bin/python ]]; do sleep 5; done  # setup runs alongside: its venv decodes
    run "$(python_bin)" "$REPO_DIR/train.py" --check-data --data "$DATA_DIR"
    mark data_end
}

cmd_bench() {  # this instance's measured rates in place of the published ones, for its own type (IMDS)
    local flags=(--device cuda --data "$DATA_DIR") type
    type=$(imds_get meta-data/instance-type)
    [[ -z $type ]] || flags+=(--instance "$type")
    [[ $HOURLY_USD == 0 ]] || flags+=(--hourly-usd "$HOURLY_USD")
    run "$(python_bin)" "$REPO_DIR/bench.py" "${flags[@]}" "$@"
}

# The restart loop: train.py writes done / stopped / preempted / crashed / bad_input / diverged to OUT/status.
trainer_cmd() {  # the command line the loop runs, one word a line
    local gpus words torchrun=torchrun
    gpus=${GPUS:-$(gpu_count)}
    # setup's venv has it (a launched instance's PATH does not, and the AMI has no PyTorch of its own)
    if [[ -x $VENV/bin/torchrun ]]; then torchrun=$VENV/bin/torchrun; fi
    if [[ -n $TRAIN_CMD ]]; then read -r -a words <<< "$TRAIN_CMD"; printf '%s\n' "${words[@]}"; else
        printf '%s\n' "$torchrun"
        if [[ $NODES != 1 ]]; then  # torchrun's static rendezvous at node 0: global rank 0 is on node 0
            printf '%s\n' "--nnodes=$NODES" "--node_rank=$NODE_RANK" "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT"
        fi
        printf '%s\n' "--nproc_per_node=$(( gpus > 0 ? gpus : 1 ))" "$REPO_DIR/train.py" --data "$DATA_DIR"
        if [[ $HOURLY_USD != 0 && $NODES == 1 ]]; then printf '%s\n' --hourly-usd "$HOURLY_USD"; fi
        if [[ $HOURLY_USD != 0 && $NODES != 1 ]]; then  # the price of all the nodes, for the log's ETA in dollars
            printf '%s\n' --hourly-usd "$(awk -v p="$HOURLY_USD" -v n="$NODES" 'BEGIN {print p * n}')"
        fi
    fi
}

ckpt_stamp() { stat -c '%Y %s' "$OUT/last.pt" 2>/dev/null || echo none; }

last_error() {  # the trainer's last line in the log that says what went wrong (not one of this script's own)
    local line
    line=$(grep -v '^run_ec2.sh: ' "$LOG" 2>/dev/null | grep -E 'error|Error|ERROR' | tail -n 1 || true)
    printf '%s' "${line:-$(grep -v -e '^[[:space:]]*$' -e '^run_ec2.sh: ' "$LOG" 2>/dev/null | tail -n 1 || true)}"
}

note() {  # a line of the restart loop, on stderr (the journal, on a launched instance) and in train.log
    say "$*"
    [[ $DRY_RUN == 1 ]] || printf 'run_ec2.sh: %s\n' "$*" >> "$LOG"
}

NODE_MODE=0  # 1 under `node`: the loop runs the trainer once, and a launcher recovers the run (RECOVER_EXIT)
recovered_by_launcher() { if [[ $NODE_MODE == 1 && $NODE_RANK == 0 ]]; then echo "$RECOVER_EXIT"; else echo 0; fi; }

HELPERS=(backup watch-spot budget watchdog)  # what train starts beside the trainer, each with its pid in OUT/NAME.pid
HELPER_PIDS=()
start_helpers() {  # the backup and the spot watcher (with S3_RUNS), the budget guard (BUDGET_USD) and the watchdog,
    # for as long as the loop runs; on a node other than 0 only its spot watcher (node 0 holds the checkpoints, the
    # money and the log the watchdog reads)
    local name
    [[ -n $S3_RUNS ]] || say "warning: S3_RUNS is not set: nothing is backed up, and a spot reclaim takes the disk with it"
    for name in "${HELPERS[@]}"; do
        case $name in backup|watch-spot) [[ -n $S3_RUNS ]] || continue ;; budget) [[ -n $BUDGET_USD ]] || continue ;; esac
        [[ $NODE_RANK == 0 || $name == watch-spot ]] || continue
        "$REPO_DIR/run_ec2.sh" "$name" >> "$( [[ $name == backup || $name == watch-spot ]] && echo "$OUT/$name.log" || echo "$LOG")" 2>&1 &
        HELPER_PIDS+=("$!")
        write_pid "$OUT/$name.pid" "$!"
    done
}

stop_helpers() {  # on the loop's way out: a trainer still running is stopped (it checkpoints); then each helper gets
    # TERM: the backup syncs once more on its way out, and the spot watcher finishes its own
    local pid
    pid=$(trainer_pid)
    if [[ -n $pid ]]; then stop_trainer "$pid"; fi
    if [[ -f $OUT/spot_notice ]]; then sleep 1; fi
    for pid in "${HELPER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${HELPER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}

loop_end() {  # WORD WHY: how the loop ended, for the end step (OUT/loop_end) and for whoever reads the log
    note "$2"
    printf '%s %s\n' "$1" "$2" > "$OUT/loop_end"
}

train_loop() {
    local restarts=0 code status before cmd pid spent
    mapfile -t cmd < <(trainer_cmd)
    write_pid "$OUT/loop.pid" $$
    rm -f "$OUT/spot_notice" "$OUT/budget_stop" "$OUT/stop_request" "$OUT/hung" "$OUT/loop_end"
    start_helpers
    trap stop_helpers EXIT
    while true; do
        if [[ -f $OUT/stop_request ]]; then  # ./run_ec2.sh stop between two starts
            echo stopped > "$OUT/status"
            loop_end stopped "training stopped by ./run_ec2.sh stop; ./run_ec2.sh resume on the laptop continues it"
            return 0
        fi
        if [[ -n $BUDGET_USD && $NODE_MODE == 0 ]]; then  # (node decides before, on every node)
            if ! read -r _ _ spent _ < <(costs); then  # costs said why: no trainer starts that no budget guards
                echo bad_input > "$OUT/status"
                loop_end bad_input "not starting: the run's spending cannot be counted against BUDGET_USD=\$$BUDGET_USD (the line above says why)"
                return 2
            fi
            if awk -v s="$spent" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; then
                echo stopped > "$OUT/status"
                loop_end stopped "not starting: \$$spent of BUDGET_USD=\$$BUDGET_USD spent; to continue, resume the run with a higher BUDGET_USD (./run_ec2.sh resume on the laptop)"
                return 0
            fi
        fi
        if [[ -f $OUT/spot_notice ]]; then  # the notice came while no trainer ran: none starts on an instance about
            loop_end preempted "spot interruption: not starting a trainer on an instance about to go"  # to go
            return "$(recovered_by_launcher)"
        fi
        rm -f "$OUT/status" "$OUT/hung"
        mark train_start
        wait_report >> "$LOG"  # where train.py's "first step at" line follows
        before=$(ckpt_stamp)
        "${cmd[@]}" --out "$OUT" "$@" >> "$LOG" 2>&1 &
        pid=$!
        write_pid "$PIDFILE" "$pid"
        code=0
        wait "$pid" || code=$?
        if [[ $NODE_RANK != 0 ]]; then  # node 0 holds the run's status and speaks for the run with its exit status;
            # this node exits 0, since SkyPilot cancels every other node at once when one exits otherwise, which
            # could cut node 0's final backup short
            loop_end node "node $NODE_RANK: the trainer exited ($code)$([[ -f $OUT/spot_notice ]] && echo " after this node's spot notice"); node 0's exit status says how the run ended"
            return 0
        fi
        status=$(cat "$OUT/status" 2>/dev/null || echo crashed)
        if [[ -f $OUT/hung ]]; then status=hung; fi  # the watchdog stopped it: a crash, as far as restarting goes
        if [[ -f $OUT/budget_stop ]]; then
            echo stopped > "$OUT/status"
            loop_end stopped "training stopped at BUDGET_USD=\$$BUDGET_USD (checkpointed; backed up); to continue, resume the run with a higher BUDGET_USD (./run_ec2.sh resume on the laptop)"
            return 0
        fi
        if [[ -f $OUT/stop_request ]]; then
            echo stopped > "$OUT/status"
            loop_end stopped "training stopped by ./run_ec2.sh stop (checkpointed); ./run_ec2.sh resume on the laptop continues it"
            return 0
        fi
        if [[ -f $OUT/spot_notice ]]; then loop_end preempted "spot interruption: not restarting on an instance about to go"; return "$(recovered_by_launcher)"; fi
        case $status in
            done|stopped) loop_end "$status" "training $status"; return 0 ;;
            bad_input) loop_end bad_input "training stopped: a config error: $(last_error)"; return 2 ;;
            diverged) loop_end diverged "training stopped: the loss diverged: $(last_error)"; return 3 ;;
            crashed|hung)
                if [[ $(ckpt_stamp) == "$before" ]]; then
                    loop_end "$status" "training $status (exit $code) with no progress since its start (last.pt did not move on), so a restart would fail the same way: $(last_error)"
                    return 1
                fi ;;
        esac
        if [[ $NODE_MODE == 1 ]]; then  # every node's trainer ended with this one: the launcher starts them anew
            loop_end "$status" "training $status (exit $code): exit $RECOVER_EXIT, for the launcher to recover the run on new instances"
            return "$RECOVER_EXIT"
        fi
        restarts=$((restarts + 1))
        if [[ $restarts -gt $MAX_RESTARTS ]]; then loop_end "$status" "giving up after $MAX_RESTARTS restarts"; return 1; fi
        note "training $status (exit $code): restart $restarts in ${RESTART_DELAY_S}s"
        sleep "$RESTART_DELAY_S"
    done
}

checkpoint_flags() {  # the training flags of OUT/last.pt's command line, one a line, but those this script sets
    [[ -f $OUT/last.pt ]] || return 0
    PYTHONPATH=$REPO_DIR "$(python_bin)" - "$OUT/last.pt" <<'PY'
import sys
import model
try:
    argv = model.read_checkpoint(sys.argv[1])["argv"] or []
except (OSError, ValueError) as e:  # the trainer refuses the file too, when it resumes from it
    sys.exit(f"run_ec2.sh: {e}")
own, i = ("--data", "--out", "--hourly-usd", "--resume"), 0
while i < len(argv):
    if argv[i].split("=")[0] in own:
        i += 1 if "=" in argv[i] else 2
        continue
    print(argv[i])
    i += 1
PY
}

cmd_restore() {  # OUT from S3_RUNS/<name of OUT> when OUT holds no checkpoint (a new instance, a recovered
    # cluster): train does it first; on several nodes every node does (each reads its own copy of last.pt)
    run mkdir -p "$OUT"
    if [[ ! -f $OUT/last.pt && -n $S3_RUNS ]]; then
        say "no local checkpoint: restoring $S3_RUNS/$(basename "$OUT")"
        run "$AWS" s3 sync "$S3_RUNS/$(basename "$OUT")" "$OUT" --only-show-errors
    fi
}

cmd_train() {
    if [[ -n $BUDGET_USD && $HOURLY_USD == 0 ]]; then  # the guard would know no price, and the run no limit
        die "BUDGET_USD=$BUDGET_USD needs the instance's price to count against: set HOURLY_USD (launch sets it from ec2_instances.json or EC2's current spot price)"
    fi
    cmd_restore
    # a resume (on another instance type, say) continues the run's own flags; those given again come later and win
    local saved=()
    if [[ ${FOREGROUND:-0} == 1 || $DRY_RUN == 1 ]]; then mapfile -t saved < <(checkpoint_flags); fi
    if [[ ${#saved[@]} -gt 0 ]]; then
        say "the run's flags from $OUT/last.pt: ${saved[*]}${*:+; given again: $*}"
        set -- "${saved[@]}" "$@"
    fi
    if [[ $DRY_RUN == 1 ]]; then
        local cmd
        mapfile -t cmd < <(trainer_cmd)
        run "${cmd[@]}" --out "$OUT" "$@"
    fi
    if [[ ${FOREGROUND:-0} == 1 ]]; then
        train_loop "$@"
        return
    fi
    # every setting through a file that only this user may read, named on the command line: a tmux server that
    # already runs gives new sessions its own environment, and a command line shows in `ps`
    local self=$REPO_DIR/run_ec2.sh file=/tmp/run_ec2-settings.DRYRUN
    if [[ $DRY_RUN != 1 ]]; then
        file=$(mktemp "${TMPDIR:-/tmp}/run_ec2-settings.XXXXXX")
        settings_env > "$file"
    fi
    if command -v tmux >/dev/null 2>&1; then
        run tmux new-session -d -s "$SESSION" "$(printf '%q ' env SETTINGS_FILE="$file" FOREGROUND=1 "$self" train "$@")"
        say "training in tmux session '$SESSION' (tmux attach -t $SESSION); log: $LOG"
    else
        run nohup env SETTINGS_FILE="$file" FOREGROUND=1 "$self" train "$@" >> "$OUT/loop.log" 2>&1 &
        say "training under nohup; log: $LOG"
    fi
}

training_active() {  # the restart loop or the trainer runs
    [[ -n $(own_pid "$OUT/loop.pid") || -n $(trainer_pid) ]]
}

backup_noted() {  # a backup that may fail (an S3 outage longer than the CLI's retries, AccessDenied): said, and
    # retried at the next round; OUT/backup.ok keeps the time of the last good one, for status
    if backup_once; then
        [[ $DRY_RUN == 1 ]] || date +%s > "$OUT/backup.ok"
    else
        say "backup to $S3_RUNS failed at $(date -u +%H:%M:%SZ); retrying in $BACKUP_MIN min (the last good one: $(backup_age))"
        return 1
    fi
}

backup_age() {  # how long ago the last good backup was, in words
    local t
    t=$(cat "$OUT/backup.ok" 2>/dev/null) || { echo never; return 0; }
    echo "$(( ($(date +%s) - t) / 60 )) min ago"
}

cmd_backup() {
    trap 'backup_noted; exit 0' TERM
    while true; do
        backup_noted || true
        training_active || break
        sleep $((BACKUP_MIN * 60)) &
        wait $! || true
    done
}

cmd_watchdog() {  # the trainer writes a log line every --log-every steps and last.pt every epoch (and every
    # --save-every-min): silence far longer than its own rhythm is a hang (a stuck NCCL call, a stuck loader), which
    # would bill by the hour with nothing to show. Silence: no write to train.log nor last.pt for HANG_S seconds, or
    # 4 times the longest silence this trainer has had between two writes, whichever is longer (its first step, an
    # evaluation, a compile at a new size).
    local pid="" seen="" last now quiet longest=0 limit
    while training_active; do
        now=$(date +%s)
        if [[ $(trainer_pid) != "$pid" ]]; then  # a new trainer: its own rhythm, from its start
            pid=$(trainer_pid) seen=$now longest=0
        fi
        if [[ -n $pid ]]; then
            last=$({ stat -c %Y "$LOG" "$OUT/last.pt" 2>/dev/null || true; } | sort -n | tail -n 1)  # one may not exist
            if [[ -n $last && $last -gt $seen ]]; then
                (( last - seen > longest )) && longest=$(( last - seen ))
                seen=$last
            fi
            quiet=$(( now - seen ))
            limit=$(( HANG_S > 4 * longest ? HANG_S : 4 * longest ))
            if (( quiet > limit )); then
                say "watchdog: the trainer (pid $pid) has written no log line and no checkpoint for $(( quiet / 60 )) min $(( quiet % 60 )) s (its limit: $(( limit / 60 )) min $(( limit % 60 )) s): it is hung; stopping it"
                touch "$OUT/hung"
                stop_trainer "$pid"
                pid=""
            fi
        fi
        sleep "$HANG_POLL_S" &
        wait $! || true
    done
}

imds_get() {  # IMDSv2: a token first, then the path; empty when there is no metadata service
    local token
    token=$(curl -s -f --max-time 2 --noproxy '*' -X PUT "$IMDS_URL/latest/api/token" \
        -H "X-aws-ec2-metadata-token-ttl-seconds: 300" || true)
    curl -s -f --max-time 2 --noproxy '*' -H "X-aws-ec2-metadata-token: $token" "$IMDS_URL/latest/$1" || true
}

cmd_watch_spot() {
    [[ -n $S3_RUNS ]] || die "watch-spot needs S3_RUNS: after a spot notice its final backup is what saves the run (set S3_RUNS=s3://bucket/runs)"
    local token code pid
    while true; do
        token=$(curl -s -f --max-time 2 --noproxy '*' -X PUT "$IMDS_URL/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 300" || true)
        code=$(curl -s --max-time 2 --noproxy '*' -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
            "$IMDS_URL/latest/meta-data/spot/instance-action" || true)
        if [[ $code == 200 ]]; then
            say "spot interruption notice: stopping the trainer"
            touch "$OUT/spot_notice"
            pid=$(trainer_pid)
            for _ in $(seq 10); do  # a trainer the loop is starting this very moment: its pid file comes next
                [[ -z $pid && -n $(own_pid "$OUT/loop.pid") ]] || break
                sleep 1
                pid=$(trainer_pid)
            done
            if [[ -n $pid ]]; then
                run kill -TERM "$pid"
                for _ in $(seq 100); do alive "$pid" || break; sleep 1; done
            fi
            backup_once
            return 0
        fi
        sleep "$SPOT_POLL_S" &
        wait $! || true
    done
}

# -----------------------------------------------------------------------------
# money: the instance's whole time since launch, as the bill counts it

launch_time() {  # "<seconds since 1970> <source>": IMDS's identity document (pendingTime), else the boot time
    local doc pending
    doc=$(imds_get dynamic/instance-identity/document | tr -d '\n')
    pending=$(printf '%s' "$doc" | sed -n 's/.*"pendingTime"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')
    if [[ -n $pending ]] && date -d "$pending" +%s >/dev/null 2>&1; then
        echo "$(date -d "$pending" +%s) IMDS"
    else
        echo "$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) )) uptime"
    fi
}

costs() {  # "hours mine spent projected_usd epochs_left min_per_epoch source": this instance's hours and dollars
    # since its launch (times NODES: node 0 counts the run's nodes, launched together), the run's dollars
    # (OUT/spent.json adds its earlier instances and clusters: it travels with the run through S3_RUNS, and each
    # updates its own entry), the projection to the last epoch (log.jsonl)
    local launched source id
    read -r launched source < <(launch_time)
    id=$(imds_get meta-data/instance-id)
    python3 - "$OUT" "$(awk -v p="$HOURLY_USD" -v n="$NODES" 'BEGIN {print p * n}')" "$launched" "$source" \
        "${id:-$(hostname)}" "$NODES" <<'PY'
import fcntl, json, os, sys, time
out, price, launched, source, me, nodes = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], \
    sys.argv[5], int(sys.argv[6])
log, record_path = os.path.join(out, "log.jsonl"), os.path.join(out, "spent.json")
rows = []
for line in open(log) if os.path.exists(log) else []:  # a torn line (a kill mid-write) is skipped, not fatal
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
hours = (time.time() - launched) / 3600
if os.path.isdir(out):  # one process at a time reads and rewrites it: the loop, the guard and status all count
    fcntl.flock(os.open(out, os.O_RDONLY), fcntl.LOCK_EX)  # (released when this process exits)
try:
    record = json.load(open(record_path)) if os.path.exists(record_path) else {}
except ValueError:
    sys.exit(f"run_ec2.sh: error: {record_path} is not JSON, so the run's earlier spending cannot be counted: restore it "
             f"from S3_RUNS, or delete it to count this instance alone")
record[me] = dict(hours=round(hours, 4), hourly_usd=price, usd=round(hours * price, 4))
if nodes > 1:  # price is then all the nodes' (HOURLY_USD is one node's)
    record[me]["nodes"] = nodes
if os.path.isdir(out):  # atomically: the backup may be copying it
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(record_path + ".tmp", record_path)
spent = sum(v["usd"] for v in record.values())
left = rows[-1]["epochs"] - rows[-1]["epoch"] - 1 if rows and "epochs" in rows[-1] else 0
per_epoch_h = sum(r["epoch_s"] for r in rows[-3:]) / len(rows[-3:]) / 3600 if rows else 0
print(f"{hours:.3f} {hours * price:.2f} {spent:.2f} {spent + left * per_epoch_h * price:.2f} {left} "
      f"{per_epoch_h * 60:.1f} {source}")
PY
}


spent_before() {  # the dollars of OUT/spent.json as restored: the run's other instances and clusters, not this one
    python3 - "$OUT/spent.json" "$(imds_get meta-data/instance-id)" <<'PY'
import json, sys
try:
    record = json.load(open(sys.argv[1]))
except OSError:  # none yet: the run's first cluster
    record = {}
except ValueError:
    sys.exit(f"run_ec2.sh: error: {sys.argv[1]} is not JSON, so the run's earlier spending cannot be counted: "
             f"restore it from S3_RUNS, or delete it there to count this cluster alone")
print(round(sum(v["usd"] for k, v in record.items() if k != sys.argv[2]), 2))
PY
}

cmd_budget() {
    [[ -n $BUDGET_USD ]] || die "set BUDGET_USD, the most this run may cost"
    [[ $HOURLY_USD != 0 ]] || die "set HOURLY_USD to the instance's price: the budget needs it"
    local warned=0 spent projected pid
    while true; do
        if ! read -r _ _ spent projected _ < <(costs); then  # said on stderr; the guard goes on
            say "budget: the costs could not be counted this time; trying again in ${BUDGET_POLL_S}s"
            spent=0 projected=0
        fi
        if [[ $warned == 0 ]] && awk -v p="$projected" -v b="$BUDGET_USD" 'BEGIN { exit !(p > b) }'; then
            say "warning: the projected cost to the last epoch, \$$projected, passes BUDGET_USD=\$$BUDGET_USD; the run will stop at \$$BUDGET_USD"
            warned=1
        fi
        if awk -v s="$spent" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; then
            if [[ ! -f $OUT/budget_stop ]]; then
                say "budget reached: \$$spent of BUDGET_USD=\$$BUDGET_USD spent: stopping the trainer (it checkpoints)"
                touch "$OUT/budget_stop"
            fi
            pid=$(trainer_pid)
            if [[ -n $pid ]]; then stop_trainer "$pid"; return 0; fi
            # no trainer yet (the loop is about to start one, which node does on every node alike): the next round
            training_active || return 0
        fi
        sleep "$BUDGET_POLL_S" &
        wait $! || true
    done
}

wait_report() {  # the wait of this instance's latest start: launch to the first step, and each part of it
    local launched
    read -r launched _ < <(launch_time)
    python3 - "$OUT/timeline.jsonl" "$LOG" "$launched" <<'PY'
import calendar, json, os, re, sys, time
path, log, launched = sys.argv[1], sys.argv[2], float(sys.argv[3])
events = []
for line in open(path) if os.path.exists(path) else []:  # a torn line (a kill mid-write) is skipped
    try:
        events.append(json.loads(line))
    except ValueError:
        pass
t = {}
for e in events:  # this boot's: the moments after the instance's launch, the latest of each
    if e["t"] >= launched - 60:
        t[e["event"]] = e["t"]
steps = re.findall(r"^first step at (\S+)Z", open(log).read(), re.M) if os.path.exists(log) else []
first = [calendar.timegm(time.strptime(s, "%Y-%m-%dT%H:%M:%S")) for s in steps]
first = [f for f in first if f >= t.get("train_start", launched)]
m = lambda a, b: f"{(t[b] - t[a]) / 60:.1f} min" if a in t and b in t else "-"
ready = max([t[k] for k in ("setup_end", "data_end") if k in t] or [launched])
parts = (f"boot {(t['setup_start'] - launched) / 60:.1f} min" if "setup_start" in t else "boot -",
         f"setup {m('setup_start', 'setup_end')}", f"data {m('data_start', 'data_end')} (alongside setup)",
         f"first step {(first[0] - ready) / 60:.1f} min after both" if first else "first step: not yet")
total = f"{(first[0] - launched) / 60:.1f} min" if first else f"{(time.time() - launched) / 60:.1f} min so far"
print(f"launch to first step: {total} ({', '.join(parts)})")
PY
}

cmd_status() {
    local pid hours mine spent projected left per_epoch source name
    pid=$(trainer_pid)
    echo "trainer: ${pid:+running (pid $pid)}${pid:-not running}; status file: $(cat "$OUT/status" 2>/dev/null || echo none)"
    if [[ -f $OUT/loop_end && -z $pid ]]; then echo "the restart loop ended: $(cut -d' ' -f2- "$OUT/loop_end")"; fi
    if [[ -f $OUT/ended.json ]]; then echo "the end step ran: $(tr -d '\n' < "$OUT/ended.json" | cut -c1-300)"; fi
    if [[ -n $(own_pid "$OUT/loop.pid") ]]; then  # the helpers should be running beside the loop: say which is not
        for name in "${HELPERS[@]}"; do
            [[ -f $OUT/$name.pid && -z $(own_pid "$OUT/$name.pid") ]] && echo "warning: the $name helper is no longer running"
        done
    fi
    if [[ -n $S3_RUNS ]]; then echo "last good backup to $S3_RUNS: $(backup_age)"; fi
    if [[ -f $REPO_DIR/.commit ]]; then echo "code: commit $(cut -c1-12 "$REPO_DIR/.commit"), as launch shipped it"; fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader
    fi
    [[ -f $LOG ]] && echo "last log line: $(tail -n 1 "$LOG")"
    if [[ -f $OUT/log.jsonl ]]; then
        "$(python_bin)" - "$OUT/log.jsonl" <<'PY' || true
import json, sys
rows = []
for line in open(sys.argv[1]):
    try:
        rows.append(json.loads(line))
    except ValueError:  # a torn line
        pass
if rows:
    print(f"epoch {rows[-1]['epoch'] + 1}: val top-1 {rows[-1]['val_top1']:.2f}% (best "
          f"{max(r['val_top1'] for r in rows):.2f}%)")
PY
    fi
    read -r hours mine spent projected left per_epoch source < <(costs) || true
    local earlier=""
    if [[ $mine != "$spent" ]]; then earlier="; the run, with its earlier instances (spent.json): \$${spent}"; fi
    echo "cost: the instance has run ${hours} h since its launch (from ${source}): \$${mine} at \$${HOURLY_USD}/h${earlier};" \
         "projected \$${projected} to the last epoch (${left} left at ${per_epoch} min each)${BUDGET_USD:+; BUDGET_USD \$$BUDGET_USD}"
    if [[ $KEEP_ALIVE == 1 ]]; then echo "KEEP_ALIVE=1: this instance stays up when its work ends; terminate it yourself"; fi
    wait_report
}

node_price() {  # HOURLY_USD, when it is not set, for this instance (IMDS: its type, market and region) as launch
    # prices one: EC2's spot price, else ec2_instances.json's on-demand price
    local market
    INSTANCE_TYPE=$(imds_get meta-data/instance-type)
    [[ -n $INSTANCE_TYPE ]] || return 0
    market=$(imds_get meta-data/instance-life-cycle)
    if [[ $market == spot ]]; then SPOT=1; else SPOT=0; fi
    REGION=$(imds_get meta-data/placement/region)
    REGION=${REGION:-us-east-1}
    read -r HOURLY_USD _ < <(launch_price) || true
    HOURLY_USD=${HOURLY_USD:-0}
    if [[ $HOURLY_USD != 0 ]]; then say "node: \$$HOURLY_USD/h a node ($INSTANCE_TYPE, $market, $REGION)"; fi
}

cmd_node() {  # [train.py flags]: this node's part of a run on NODES nodes that a launcher started on each
    # (skypilot.yaml), in the foreground, after `restore`: torchrun over the nodes, once, then an exit status for
    # the launcher, from node 0, which holds the run's status (the others exit 0). RECOVER_EXIT (75): recover the run
    # on new instances (a spot notice, a preemption, a crash or a hang after progress); any other ends the run and
    # the job: 0 done or stopped at the budget, 1 a crash with no progress since its start, 2 a config error, 3 a
    # diverged loss. Node 0 alone backs up, keeps the budget over every node and every cluster of the run
    # (spent.json), watches for hangs, and runs finish and the end step; every node watches for its own spot notice.
    # A node that stopped before the others started would leave them waiting at the rendezvous, so what decides
    # before the start is the same on every node.
    [[ -n $S3_RUNS ]] || die "node needs S3_RUNS: a recovered run continues from there (set S3_RUNS=s3://bucket/runs)"
    [[ $NODE_RANK =~ ^[0-9]+$ && $NODES =~ ^[0-9]+$ && $NODE_RANK -lt $NODES ]] \
        || die "NODE_RANK=$NODE_RANK of NODES=$NODES: set both (skypilot.yaml sets them from SkyPilot's variables)"
    if [[ -n $BUDGET_USD && $HOURLY_USD == 0 ]]; then node_price; fi
    [[ -z $BUDGET_USD || $HOURLY_USD != 0 ]] \
        || die "BUDGET_USD=$BUDGET_USD needs a node's price: set HOURLY_USD (EC2 and ec2_instances.json have none for this instance)"
    NODE_MODE=1 JOURNAL=true  # no systemd service here: ended.json keeps train.log's tail
    local code=0 before
    before=$(spent_before) || exit 2  # (it said why)
    if [[ -n $BUDGET_USD ]] && awk -v s="$before" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; then
        [[ $NODE_RANK != 0 ]] || echo stopped > "$OUT/status"
        loop_end stopped "not starting: \$$before of BUDGET_USD=\$$BUDGET_USD spent by the run's earlier instances (spent.json); to continue, launch it again with a higher BUDGET_USD"
    else
        local shown=""
        if [[ $NODE_RANK == 0 ]]; then  # the run's lines (img/s, ETA, top-1) in the launcher's log too
            tail -n 0 -F "$LOG" 2>/dev/null & shown=$!
        fi
        train_loop "$@" || code=$?
        [[ -z $shown ]] || kill "$shown" 2>/dev/null || true
    fi
    if [[ $NODE_RANK == 0 ]]; then
        if [[ $FINISH == 1 ]]; then (cmd_finish auto) || true; fi
        cmd_end train "$code"
    fi
    return "$code"
}

cmd_stop() {  # a user's stop, which is final: the loop does not restart the trainer, and a launched instance then
    # runs its end step and shuts down (unless KEEP_ALIVE=1); `resume` on the laptop continues the run
    local pid
    pid=$(trainer_pid)
    if [[ -z $pid && -z $(own_pid "$OUT/loop.pid") ]]; then say "no training runs for $OUT: nothing to stop"; return 0; fi
    run touch "$OUT/stop_request"
    if [[ -n $pid ]]; then run kill -TERM "$pid"; say "sent SIGTERM to the trainer (pid $pid): it checkpoints, and the loop ends"; fi
}

cmd_finish() {  # [auto]: the run's results, made where its data is: the evaluation's reports, the Grad-CAM dump of the
    # worst 32, the Space with photos of the val set, and a weights-only best.pt, in OUT/results, then backed up.
    # FINISH_MIN bounds it; what failed is said in OUT/results/finish.json (and so in ended.json). auto (the launched
    # service): only after the run ended done, or stopped at its budget.
    local ckpt=$OUT/best.pt res=$OUT/results py t0 word="done" failed=() step
    if [[ -f $OUT/loop_end ]]; then read -r word _ < "$OUT/loop_end"; fi
    if [[ ${1:-} == auto && $word != "done" && ! ( $word == stopped && -f $OUT/budget_stop ) ]]; then
        say "finish: the run ended '$word', neither done nor at its budget: no results made"
        return 0
    fi
    mkdir -p "$res"
    if [[ ! -f $ckpt ]]; then
        echo '{"ok": false, "failed": ["no best.pt"], "seconds": 0}' > "$res/finish.json"
        die "no $ckpt: the run has no best checkpoint to make results of"
    fi
    py=$(python_bin)
    t0=$(date +%s)
    for step in evaluate gradcam space weights; do
        local left=$(( FINISH_MIN * 60 - ($(date +%s) - t0) ))
        if (( left <= 0 )); then failed+=("$step (FINISH_MIN=$FINISH_MIN passed)"); continue; fi
        say "finish: $step"
        case $step in  # gradcam.py reads evaluate.py's predictions.csv, made with the same settings
            evaluate) timeout "$left" "$py" "$REPO_DIR/evaluate.py" --checkpoint "$ckpt" --data "$DATA_DIR" --out "$res/eval" ;;
            gradcam) timeout "$left" "$py" "$REPO_DIR/gradcam.py" --checkpoint "$ckpt" --data "$DATA_DIR" --worst 32 --out "$res/eval" ;;
            space) timeout "$left" "$py" "$REPO_DIR/app.py" --checkpoint "$ckpt" --examples "$DATA_DIR" --export-space "$res/space" ;;
            weights) PYTHONPATH=$REPO_DIR timeout "$left" "$py" -c 'import sys, model
model.save_weights(model.read_checkpoint(sys.argv[1]), sys.argv[2])' "$ckpt" "$res/best.pt" ;;
        esac || failed+=("$step")
    done
    python3 -c 'import json, sys, time
print(json.dumps(dict(ok=len(sys.argv) == 2, failed=sys.argv[2:], seconds=round(time.time() - float(sys.argv[1])))))' \
        "$t0" "${failed[@]}" > "$res/finish.json"
    if [[ ${#failed[@]} -gt 0 ]]; then say "finish: failed: ${failed[*]} (OUT/results/finish.json)"; else say "finish: the results are in $res"; fi
    [[ -z $S3_RUNS ]] || backup_noted || true
}

cmd_end() {  # STAGE [CODE]: the end step of a launched instance, whatever ended its work (the service runs it, then
    # shuts down): the final backup, retried for END_BACKUP_MIN, then OUT/ended.json, the record of why it ended,
    # beside the run in S3 (beside the shards, for prepare)
    local stage=${1:-train} code=${2:-0} word why backup=ok t0 dest
    t0=$(date +%s)
    mkdir -p "$OUT"
    if [[ $stage == train && -f $OUT/loop_end ]]; then
        read -r word why < "$OUT/loop_end"
    elif [[ $stage == train ]]; then
        word=crashed why="the restart loop ended without saying why (exit $code)"
    elif [[ $stage == prepare && $code == 0 ]]; then
        word="done" why="prepare finished"
    else
        word=failed why="$stage failed (exit $code)"
        if [[ $code == 124 ]]; then why+=": its time limit passed"; fi
    fi
    if [[ $stage != prepare && -n $S3_RUNS ]]; then
        until backup_noted; do
            if (( $(date +%s) - t0 >= END_BACKUP_MIN * 60 )); then
                backup="failed for END_BACKUP_MIN=$END_BACKUP_MIN min; the last good backup: $(backup_age)"
                break
            fi
            sleep 30
        done
    elif [[ $stage != prepare ]]; then
        backup="none: S3_RUNS is not set"
    fi
    say "the end: $word: $why; final backup: $backup"
    # shellcheck disable=SC2086  # JOURNAL is a command line
    ENDED_JOURNAL=$($JOURNAL 2>/dev/null | tail -n 40 || true) python3 - "$OUT/ended.json" "$stage" "$word" "$why" \
        "$code" "$backup" "$KEEP_ALIVE" "$(imds_get meta-data/instance-id)" "$(imds_get meta-data/instance-type)" \
        "$RUN" "$LOG" "$(cat "$REPO_DIR/.commit" 2>/dev/null || true)" "$OUT/results/finish.json" <<'PY'
import json, os, sys, time
path, stage, word, why, code, backup, keep, instance, kind, run, log, commit, finish = sys.argv[1:]
tail = open(log, errors="replace").read().splitlines()[-20:] if os.path.exists(log) else []
record = dict(run=run, status=word, why=why, stage=stage, exit=int(code), backup=backup, keep_alive=keep == "1",
              instance=instance or None, instance_type=kind or None, commit=commit or None,
              finish=json.load(open(finish)) if os.path.exists(finish) else None,
              ended=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              journal=os.environ["ENDED_JOURNAL"].splitlines(), train_log=tail)
with open(path + ".tmp", "w") as f:
    json.dump(record, f, indent=1)
os.replace(path + ".tmp", path)
PY
    if [[ -n $KAGGLE_PARAM ]]; then  # prepare's Kaggle token: read once, never left behind
        rm -f -- "$HOME/.kaggle-run_ec2/kaggle.json"
        "$AWS" ssm delete-parameter --name "$KAGGLE_PARAM" 2>/dev/null && say "deleted the Kaggle token's SSM parameter $KAGGLE_PARAM"
    fi
    if [[ $stage == prepare ]]; then dest=$SHARDS; else dest=${S3_RUNS:+$S3_RUNS/$(basename "$OUT")}; fi
    if [[ -n $dest ]]; then
        "$AWS" s3 cp "$OUT/ended.json" "$dest/ended.json" --only-show-errors || say "could not copy ended.json to $dest"
    fi
    return 0
}

# -----------------------------------------------------------------------------
# on the laptop: launch and look after an instance with the AWS CLI only

aws_q() {  # an AWS call whose output is needed; under DRY_RUN, printed, with $1 as the stand-in output
    local stand_in=$1
    shift
    if [[ $DRY_RUN == 1 ]]; then printf '+ %s %s\n' "$AWS" "$*" >&2; echo "$stand_in"; else "$AWS" --region "$REGION" "$@"; fi
}

s3_path() {  # s3://bucket/a/b -> "bucket a/b"
    local rest=${1#s3://}
    [[ $1 == s3://* && -n ${rest%%/*} ]] || die "$1 is not an s3://bucket/path address"
    local prefix=${rest#"${rest%%/*}"}
    echo "${rest%%/*} ${prefix#/}"
}

read_data_json() {  # the statements that let a role list and read S3_DATA (the shards beside it included)
    local db dp
    read -r db dp < <(s3_path "$S3_DATA")
    cat <<JSON
  {"Sid": "ListData", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::$db",
   "Condition": {"StringLike": {"s3:prefix": ["${dp:-*}", "${dp:+$dp/*}"]}}},
  {"Sid": "ReadData", "Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::$db/${dp:+$dp/}*"},
JSON
}

policy_json() {  # the training instance's role may read S3_DATA, read and write its own run's folder in S3_RUNS
    # (S3_RUNS/RUN), and nothing else: not another run's, which a second launch must never be able to touch
    local rb rp
    read -r rb rp < <(s3_path "$S3_RUNS")
    rp=${rp:+$rp/}$RUN
    cat <<JSON
{"Version": "2012-10-17", "Statement": [
$(read_data_json)
  {"Sid": "ListRun", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::$rb",
   "Condition": {"StringLike": {"s3:prefix": ["$rp", "$rp/*"]}}},
  {"Sid": "ReadWriteRun", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
   "Resource": "arn:aws:s3:::$rb/$rp/*"}
]}
JSON
}

prepare_policy_json() {  # prepare's instance may read S3_DATA and write SHARDS (multipart uploads too), and read and
    # delete its Kaggle token (FROM_KAGGLE), nothing else
    local sb sp db dp token=""
    read -r sb sp < <(s3_path "$SHARDS")
    if [[ -n $KAGGLE_PARAM ]]; then
        token=$',\n  {"Sid": "KaggleToken", "Effect": "Allow", "Action": ["ssm:GetParameter", "ssm:DeleteParameter"],'
        token+=$'\n   "Resource": "arn:aws:ssm:'"$REGION"':*:parameter'"$KAGGLE_PARAM"'"}'
    fi
    if [[ $FROM_KAGGLE == 1 && $KEEP_ZIP == 1 ]]; then  # and the competition's zip beside the shards
        read -r db dp < <(s3_path "$S3_DATA")
        token+=$',\n  {"Sid": "KeepZip", "Effect": "Allow", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::'
        token+="$db/${dp:+$dp/}$KAGGLE_COMPETITION.zip\"}"
    fi
    cat <<JSON
{"Version": "2012-10-17", "Statement": [
$(read_data_json)
  {"Sid": "ListUploads", "Effect": "Allow", "Action": "s3:ListBucketMultipartUploads", "Resource": "arn:aws:s3:::$sb"},
  {"Sid": "WriteShards", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload",
   "s3:ListMultipartUploadParts"], "Resource": "arn:aws:s3:::$sb/$sp/*"}$token
]}
JSON
}

code_ready() {  # launch ships this checkout's commit (below): a clone of the repository, with nothing uncommitted, so
    # that a run trains a commit that can be named (list, status and ended.json name it); said before anything is made
    git -C "$REPO_DIR" rev-parse -q --verify HEAD >/dev/null 2>&1 \
        || die "launch ships this checkout's commit to the instance: run it in a git clone of this repository"
    if [[ -n $(git -C "$REPO_DIR" status --porcelain --untracked-files=no) ]]; then
        [[ $DRY_RUN == 1 ]] || die "this checkout has changes that are not committed (git status): commit them or git stash them, so that the instance trains a commit you can name"
        say "DRY_RUN: this checkout has uncommitted changes, which launch would refuse"
    fi
}

ship_code() {  # this checkout's commit, as a git archive, into S3 at $1, where the instance's role reads it: the
    # instance needs no access to the repository, and unpushed commits and private repositories train as they are
    if [[ $DRY_RUN == 1 ]]; then
        CODE_COMMIT=$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo DRYRUN) CODE_URL=$1/code-$CODE_COMMIT.tar.gz
        printf '+ git archive --format=tar.gz HEAD | %s s3 cp - %s\n' "$AWS" "$CODE_URL" >&2
        return 0
    fi
    CODE_COMMIT=$(git -C "$REPO_DIR" rev-parse HEAD) CODE_URL=$1/code-$CODE_COMMIT.tar.gz
    git -C "$REPO_DIR" archive --format=tar.gz HEAD | "$AWS" --region "$REGION" s3 cp - "$CODE_URL" --only-show-errors \
        || die "could not copy the code to $CODE_URL"
    say "the instance runs commit ${CODE_COMMIT:0:12} ($(git -C "$REPO_DIR" log -1 --format=%s | cut -c1-60)), shipped to $CODE_URL"
}

TRUST_JSON='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'

exists() {  # an AWS lookup that succeeds; under DRY_RUN nothing exists yet, so every creation is printed
    [[ $DRY_RUN != 1 ]] && "$AWS" --region "$REGION" "$@" >/dev/null 2>&1
}

role_name() {  # the IAM role and instance profile of this launch, one per run (one per dataset for prepare), so that
    # launching one run never changes what another's instance may do; IAM allows 64 of [A-Za-z0-9+=,.@_-]
    local name
    if [[ $PREPARE == 1 ]]; then name=$NAME_PREFIX-prepare-$(basename "$S3_DATA"); else name=$NAME_PREFIX-$RUN; fi
    name=${name//[^A-Za-z0-9+=,.@_-]/-}
    if (( ${#name} > 64 )); then name=${name:0:54}-$(printf '%s' "$name" | cksum | cut -d' ' -f1); fi
    echo "${name:0:64}"
}

ensure_role() {  # role $1 with inline policy $2 (rewritten each launch of its run: its prefixes may have changed),
    # tagged as this script's, and its instance profile
    local role=$1
    if ! exists iam get-role --role-name "$role"; then
        aws_q "" iam create-role --role-name "$role" --assume-role-policy-document "$TRUST_JSON" \
            --tags "Key=made-by,Value=run_ec2.sh" >/dev/null
    fi
    aws_q "" iam put-role-policy --role-name "$role" --policy-name "$role-s3" --policy-document "$2" >/dev/null
    if ! exists iam get-instance-profile --instance-profile-name "$role"; then
        aws_q "" iam create-instance-profile --instance-profile-name "$role" >/dev/null
        aws_q "" iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role" >/dev/null
    fi
}

remove_role() {  # the run's role and profile, once no instance uses them, and only when this script made them
    local role=$1
    [[ $("$AWS" --region "$REGION" iam list-role-tags --role-name "$role" --query "Tags[?Key=='made-by'].Value" \
        --output text 2>/dev/null) == run_ec2.sh ]] || return 0
    "$AWS" --region "$REGION" iam remove-role-from-instance-profile --instance-profile-name "$role" --role-name "$role" 2>/dev/null || true
    "$AWS" --region "$REGION" iam delete-instance-profile --instance-profile-name "$role" 2>/dev/null || true
    "$AWS" --region "$REGION" iam delete-role-policy --role-name "$role" --policy-name "$role-s3" 2>/dev/null || true
    "$AWS" --region "$REGION" iam delete-role --role-name "$role" >/dev/null 2>&1 && say "removed the run's IAM role and instance profile $role"
}

SG_MARK="run_ec2.sh launch"  # the description of the SSH rules launch adds: the only rules it ever replaces

ensure_sg() {  # a security group that lets SSH in from MY_IP only; prints its id. A launch from a new address
    # replaces the rules that launch added (SG_MARK), never one of yours, so rules do not pile up
    local ip=$MY_IP sg old cidr have=0
    if [[ -z $ip ]]; then
        ip=$(curl -s -f --max-time 5 https://checkip.amazonaws.com | tr -d '[:space:]') || die "could not find this machine's public IP; set MY_IP"
    fi
    # the group's id and the addresses of the rules launch added, in one call; none: the group is still to be made
    if [[ $DRY_RUN != 1 ]] && old=$("$AWS" --region "$REGION" ec2 describe-security-groups --group-names \
            "$NAME_PREFIX" --output text --query "SecurityGroups[0].[GroupId, IpPermissions[?FromPort==\`22\`]
            .IpRanges[] | [?Description=='$SG_MARK'].CidrIp]" 2>/dev/null); then
        read -r -d '' sg old <<< "${old//[[:space:]]/ }" || true  # text output: the id, then the addresses
        for cidr in $old; do
            if [[ $cidr == "$ip/32" ]]; then have=1; continue; fi
            "$AWS" --region "$REGION" ec2 revoke-security-group-ingress --group-id "$sg" --ip-permissions \
                "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr}]" >/dev/null
            say "SSH from $cidr (an earlier launch's address) no longer allowed: SSH is open to $ip/32"
        done
    else
        sg=$(aws_q sg-DRYRUN ec2 create-security-group --group-name "$NAME_PREFIX" \
            --description "SSH to run_ec2.sh instances" --query GroupId --output text)
    fi
    if [[ $have == 1 ]]; then :
    elif [[ $DRY_RUN == 1 ]]; then
        aws_q "" ec2 authorize-security-group-ingress --group-id "$sg" --ip-permissions \
            "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ip/32,Description=\"$SG_MARK\"}]" >/dev/null
    else  # fails when the address has a rule already, unmarked: a rule of yours, or of a launch before the marks
        "$AWS" --region "$REGION" ec2 authorize-security-group-ingress --group-id "$sg" --ip-permissions \
            "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$ip/32,Description=\"$SG_MARK\"}]" >/dev/null 2>&1 || true
    fi
    echo "$sg"
}

user_data() {  # the instance's boot script: RUN_USER runs setup, data and train (or prepare) now and after every
    # reboot, and however that ends, the end step and a shutdown follow
    local name
    cat <<'EOF'
#!/bin/bash
# run_ec2.sh launch's user-data: a systemd service that runs setup, data and train (or prepare) as RUN_USER, now and
# after every reboot; each step is idempotent, so a reboot (or `run_ec2.sh resume` on a new instance) picks up where
# it was. However its work ends, the service runs the end step (the final backup, and ended.json in S3 saying why)
# and shuts the instance down, which terminates it, unless KEEP_ALIVE=1; and it shuts down DEADLINE (launch +
# MAX_HOURS) at the latest. BOOT_ROOT, SYSTEMCTL and SHUTDOWN let a test run this file on another machine.
set -euo pipefail
BOOT_ROOT=${BOOT_ROOT:-}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
SHUTDOWN=${SHUTDOWN:-shutdown -h}
EOF
    printf 'KEEP_ALIVE=%q\n' "$KEEP_ALIVE"
    cat <<'EOF'
# a failure before the service runs would leave the instance idle at its full price
trap 'echo "run_ec2.sh user-data failed before its service started" >&2; [ "$KEEP_ALIVE" = 1 ] || $SHUTDOWN now' EXIT
umask 077  # the settings are RUN_USER's alone
mkdir -p "$BOOT_ROOT/etc" "$BOOT_ROOT/usr/local/bin" "$BOOT_ROOT/etc/systemd/system"
cat > "$BOOT_ROOT/etc/resnet-run.env" <<'ENV'
EOF
    for name in RUN_USER RUN CODE_URL CODE_COMMIT REPO DATA_DIR S3_DATA S3_RUNS OUT HOURLY_USD BUDGET_USD TRAIN_ARGS \
                PREPARE SHARDS SHRINK SHRINK_BY FORMAT_STORE KEEP_ALIVE DEADLINE MAX_HOURS PREPARE_HOURS FROM_KAGGLE \
                KAGGLE_PARAM KAGGLE_COMPETITION KEEP_ZIP; do
        printf '%s=%q\n' "$name" "${!name}"
    done
    cat <<'EOF'
ENV
# shellcheck source=/dev/null
. "$BOOT_ROOT/etc/resnet-run.env"
chown "$RUN_USER" "$BOOT_ROOT/etc/resnet-run.env"
cat > "$BOOT_ROOT/usr/local/bin/resnet-run" <<SCRIPT
#!/bin/bash
set -euo pipefail
set -a
# shellcheck source=/dev/null
. "$BOOT_ROOT/etc/resnet-run.env"
set +a
SCRIPT
cat >> "$BOOT_ROOT/usr/local/bin/resnet-run" <<'SCRIPT'
SHUTDOWN=${SHUTDOWN:-sudo shutdown -h}
stage=start
the_end() {  # however the work below ended: the end step (the final backup, ended.json), then the shutdown
    code=$?
    trap - EXIT
    if [ -x "$REPO/run_ec2.sh" ]; then
        "$REPO/run_ec2.sh" end "$stage" "$code" || true
    else  # no code to run it (it did not arrive): the record alone, and prepare's Kaggle token goes
        if [ "$PREPARE" = 1 ]; then dest=$SHARDS; else dest=$S3_RUNS/$RUN; fi
        [ -z "$KAGGLE_PARAM" ] || aws ssm delete-parameter --name "$KAGGLE_PARAM" || true
        printf '{"run": "%s", "status": "failed", "stage": "%s", "exit": %s, "why": "%s failed before the code was on the instance: the journal of resnet-run.service says why"}\n' \
            "$RUN" "$stage" "$code" "$stage" | aws s3 cp - "$dest/ended.json" --only-show-errors || true
    fi
    if [ "$KEEP_ALIVE" = 1 ]; then
        echo "run_ec2.sh: KEEP_ALIVE=1: the instance stays up; terminate it when you are done" >&2
    else
        $SHUTDOWN now
    fi
}
trap the_end EXIT
left=$(( (DEADLINE - $(date +%s)) / 60 ))
if [ "$left" -le 0 ]; then stage=lifetime; echo "MAX_HOURS=$MAX_HOURS have passed since the launch" >&2; exit 1; fi
$SHUTDOWN "+$left"  # the instance's lifetime, whatever happens below
stage=code  # the commit launch shipped to S3 (the instance needs no access to the repository)
if [ "$(cat "$REPO/.commit" 2>/dev/null)" != "$CODE_COMMIT" ]; then
    mkdir -p "$REPO"
    aws s3 cp "$CODE_URL" - --only-show-errors | tar -xzf - -C "$REPO"
    echo "$CODE_COMMIT" > "$REPO/.commit"
fi
cd "$REPO"
if [ "$PREPARE" = 1 ]; then  # a CPU instance that makes the shards once, keeps its log beside them, and goes
    stage=setup
    ./run_ec2.sh setup
    stage=prepare
    timeout "${PREPARE_HOURS}h" ./run_ec2.sh prepare 2>&1 | tee "$HOME/prepare.log"
    aws s3 cp "$HOME/prepare.log" "$SHARDS/prepare.log" --only-show-errors || true
    exit 0
fi
stage=data
data_pid=""
if [ ! -f "$DATA_DIR/.run_ec2_data_done" ]; then ./run_ec2.sh data & data_pid=$!; fi  # the shards stream in while
stage=setup
./run_ec2.sh setup                                                                     # setup installs
stage=data
if [ -n "$data_pid" ]; then wait "$data_pid"; touch "$DATA_DIR/.run_ec2_data_done"; fi
stage=train
read -r -a flags <<< "$TRAIN_ARGS"
FOREGROUND=1 ./run_ec2.sh train "${flags[@]}"
./run_ec2.sh finish auto || true  # after done or the budget: the results, beside the run in S3 (finish.json says)
SCRIPT
chmod +x "$BOOT_ROOT/usr/local/bin/resnet-run"
cat > "$BOOT_ROOT/etc/systemd/system/resnet-run.service" <<UNIT
[Unit]
Description=run_ec2.sh: setup, data and train (or prepare), then the end step and a shutdown
After=network-online.target
Wants=network-online.target
[Service]
Type=simple
User=$RUN_USER
ExecStart=/usr/local/bin/resnet-run
Restart=no
TimeoutStopSec=120
[Install]
WantedBy=multi-user.target
UNIT
"$SYSTEMCTL" daemon-reload
"$SYSTEMCTL" enable --now resnet-run.service
trap - EXIT
EOF
}

state_file() { echo "$STATE_DIR/$RUN.instance"; }

instance_id() {  # the state file's first line (the instance of RUN that launch started; the rest is its price)
    [[ -f $(state_file) ]] || die "no instance recorded for RUN=$RUN in $STATE_DIR; launch one first"
    head -n 1 "$(state_file)" | cut -d' ' -f1
}

TYPE_FACTS=""  # INSTANCE_TYPE's "vCPUs instance-store-GB EBS-MB/s EBS-IOPS", once asked (check and launch both read it)
type_facts() {  # sets TYPE_FACTS from DescribeInstanceTypes (the EBS link's baselines); "" when EC2 knows no such type
    [[ -n $TYPE_FACTS ]] && return 0
    TYPE_FACTS=$(aws_q "4 250 125 3000" ec2 describe-instance-types --instance-types "$INSTANCE_TYPE" --output text \
        --query 'InstanceTypes[0].[VCpuInfo.DefaultVCpus,InstanceStorageInfo.TotalSizeInGB,EbsInfo.EbsOptimizedInfo.BaselineThroughputInMBps,EbsInfo.EbsOptimizedInfo.BaselineIops]' \
        2>/dev/null | awk '$1 ~ /^[0-9]+$/ {printf "%d %d %d %d\n", $1, ($2 == "None" ? 0 : $2), $3, $4}') || true
}

data_gb() {  # GB of the smallest complete shards under S3_DATA (what data stages, at worst), or nothing
    local picked
    picked=$(pick_shards 0)
    [[ -z $picked ]] || echo $(( ${picked#* } / 1000000000 + 1 ))
}

table_price() {  # INSTANCE_TYPE's on-demand $/h in ec2_instances.json (us-east-1's), or nothing
    python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["instances"].get(sys.argv[2], {}).get("on_demand", ""))' \
        "$PRICES" "$INSTANCE_TYPE" 2>/dev/null || true
}

launch_price() {  # "$/h how": the price the budget and status count, and where it came from: HOURLY_USD; for spot,
    # EC2's current spot price, the highest over REGION's zones (the instance may land in any); else the on-demand
    # price of ec2_instances.json, which no spot price exceeds
    local price
    if [[ $HOURLY_USD != 0 ]]; then echo "$HOURLY_USD HOURLY_USD"; return 0; fi
    if [[ $SPOT == 1 ]]; then
        price=$(aws_q 1.0 ec2 describe-spot-price-history --instance-types "$INSTANCE_TYPE" \
            --product-descriptions Linux/UNIX --start-time "$(date -u +%Y-%m-%dT%H:%M:%S)" \
            --query 'SpotPriceHistory[].SpotPrice' --output text 2>/dev/null | tr -s '\t ' '\n' | sort -g | tail -n 1)
        if [[ $price =~ ^[0-9.]+$ ]]; then echo "$price EC2's current spot price in $REGION (its dearest zone)"; return 0; fi
    fi
    price=$(table_price)
    [[ -n $price ]] || return 0
    [[ $REGION == us-east-1 ]] || say "warning: $price \$/h is ec2_instances.json's on-demand price in us-east-1, not in $REGION: set HOURLY_USD to $INSTANCE_TYPE's price there"
    echo "$price ec2_instances.json's on-demand price$([[ $SPOT == 1 ]] && echo ", an upper bound of the spot price")"
}

runs_of() {  # "id state" of every instance tagged with run $1 that is not gone
    aws_q "" ec2 describe-instances --filters "Name=tag:run,Values=$1" \
        "Name=instance-state-name,Values=pending,running,stopping,stopped" \
        --query 'Reservations[].Instances[].[InstanceId,State.Name]' --output text
}

run_instance() {  # run-instances with the arguments given, in each zone of REGION that offers the type until one
    # has capacity, once the errors that a retry cannot mend are told apart: a quota or an unsupported configuration
    # stops at once, with its code and the fix; no capacity moves on to the next zone; a lost answer (or a new
    # instance profile still propagating) is retried in the same zone. Each zone's request has a client token of its
    # own, which its retries reuse, so an ambiguous failure (a timeout after EC2 started it) never starts a second one.
    local zones=() zone place token out code attempt err tried=()
    if [[ -z ${ZONES:-} ]]; then  # check, when it ran, has them already
        ZONES=$(aws_q "" ec2 describe-instance-type-offerings --location-type availability-zone --filters \
            "Name=instance-type,Values=$INSTANCE_TYPE" --query 'InstanceTypeOfferings[].Location' --output text \
            2>/dev/null || true)
    fi
    read -r -a zones <<< "${ZONES//[[:space:]]/ }"
    [[ ${#zones[@]} -gt 0 ]] || zones=("")  # none listed: EC2 picks the zone
    err=$(mktemp)
    for zone in "${zones[@]}"; do
        place=()
        [[ -z $zone ]] || place=(--placement "AvailabilityZone=$zone")
        token=$(printf '%s-%s-%s-%s' "$RUN" "$(date +%s)" "$RANDOM" "$zone" | tr -c 'A-Za-z0-9-\n' '-' | cut -c1-64)
        tried+=("${zone:-any zone}")
        for attempt in 1 2 3 4 5 6; do
            if out=$(aws_q i-DRYRUN ec2 run-instances "$@" "${place[@]}" --client-token "$token" \
                     --query 'Instances[0].InstanceId' --output text 2>"$err"); then
                cat "$err" >&2
                rm -f -- "$err"
                echo "$out"
                return 0
            fi
            out=$(cat "$err")
            code=$(sed -n 's/.*An error occurred (\([A-Za-z.]*\)).*/\1/p' <<< "$out" | head -n 1)
            case $code in
                VcpuLimitExceeded|InstanceLimitExceeded|MaxSpotInstanceCountExceeded)
                    die "$code: $INSTANCE_TYPE needs more vCPUs than this account's $([[ $SPOT == 1 ]] && echo spot || echo on-demand) quota in $REGION allows (spot and on-demand have quotas of their own): ./run_ec2.sh check names the quota and the value to ask for; or use another INSTANCE_TYPE or SPOT=$(( 1 - SPOT ))" ;;
                Unsupported|UnsupportedOperation|InvalidParameterCombination)
                    die "$code: $INSTANCE_TYPE cannot be launched so in $REGION ($(tail -n 1 <<< "$out")): use another INSTANCE_TYPE or REGION" ;;
                InsufficientInstanceCapacity|InsufficientCapacity|UnfulfillableCapacity|InsufficientHostCapacity)
                    say "run-instances: $code in ${zone:-any zone}: trying the next zone"
                    continue 2 ;;
                RequestLimitExceeded|ServiceUnavailable|Unavailable|InternalError|"")
                    ;;  # no code at all: the answer was lost, and the same token is safe
                InvalidParameterValue)
                    [[ $out == *nstance?rofile* || $out == *iamInstanceProfile* ]] \
                        || die "$code: $(tail -n 1 <<< "$out")" ;;  # a new instance profile takes seconds to be usable
                *) die "$code: $(tail -n 1 <<< "$out")" ;;
            esac
            say "run-instances: ${code:-no answer} in ${zone:-any zone} (try $attempt of 6): trying again in ${LAUNCH_RETRY_S:-10} s with the same client token"
            [[ $attempt == 6 ]] || sleep "${LAUNCH_RETRY_S:-10}"
        done
    done
    rm -f -- "$err"
    die "no $INSTANCE_TYPE to be had in $REGION (tried ${tried[*]}; last: ${code:-no answer}): try again later, SPOT=$(( 1 - SPOT )), another INSTANCE_TYPE or REGION"
}

quota_for() {  # "code name class" of the vCPU quota that INSTANCE_TYPE counts against in SPOT's market (spot and
    # on-demand are separate quotas), from ec2_instances.json; nothing for a class it does not list
    python3 - "$PRICES" "$1" "$2" <<'PY' 2>/dev/null || true
import json, re, sys
classes = json.load(open(sys.argv[1]))["quotas"]["classes"]
family = re.match(r"[a-z]+", sys.argv[2]).group(0)
for name, c in classes.items():
    if family in c["families"]:
        q = c["spot" if sys.argv[3] == "1" else "on_demand"]
        print(q["code"], name.replace(" ", "_"), q["name"])
PY
}

vcpus_in_use() {  # vCPUs of this account's running and pending instances in REGION of quota class $1, market $2
    local rows types
    rows=$(aws_q "" ec2 describe-instances --filters Name=instance-state-name,Values=pending,running --output text \
        --query 'Reservations[].Instances[].[InstanceType, InstanceLifecycle]')
    [[ -n $rows ]] || { echo 0; return 0; }
    types=$(awk '{print $1}' <<< "$rows" | sort -u | tr '\n' ' ')
    # shellcheck disable=SC2086  # the types, one word each
    aws_q "" ec2 describe-instance-types --instance-types $types --output text \
        --query 'InstanceTypes[].[InstanceType, VCpuInfo.DefaultVCpus]' | python3 -c '
import json, re, sys
vcpus = dict(line.split() for line in sys.stdin if line.strip())
classes = json.load(open(sys.argv[1]))["quotas"]["classes"]
cls, spot, rows = sys.argv[2].replace("_", " "), sys.argv[3] == "1", sys.argv[4].splitlines()
total = 0
for row in rows:
    kind, lifecycle = row.split()[0], (row.split() + ["None"])[1]
    if re.match(r"[a-z]+", kind).group(0) in classes[cls]["families"] and (lifecycle == "spot") == spot:
        total += int(vcpus.get(kind, 0))
print(total)' "$PRICES" "$1" "$2" "$rows"
}

cmd_check() {  # before any instance is paid for: what would stop a launch, each said in one line with its fix
    [[ -n $INSTANCE_TYPE ]] || die "set INSTANCE_TYPE, e.g. g5.xlarge (README 'Choosing an instance')"
    local failed=() code cls name quota need used zones bucket where url market what=$INSTANCE_TYPE
    market=$([[ $SPOT == 1 ]] && echo spot || echo on-demand)
    [[ $NODES == 1 ]] || what="$NODES x $INSTANCE_TYPE"  # a run on several nodes (SkyPilot) needs them all at once
    # the vCPU quota of the type's class and market, less what runs already (new accounts often start at 0)
    read -r code cls name < <(quota_for "$INSTANCE_TYPE" "$SPOT") || true
    type_facts
    need=${TYPE_FACTS%% *}
    if [[ $need =~ ^[0-9]+$ ]]; then need=$(( need * NODES )); fi
    if [[ ! $need =~ ^[0-9]+$ ]]; then
        failed+=("$INSTANCE_TYPE is not an instance type that EC2 knows in $REGION: check its name (aws ec2 describe-instance-types)")
    elif [[ -z ${code:-} ]]; then
        say "check: $INSTANCE_TYPE's vCPU quota is of a class ec2_instances.json does not list: not checked"
    else
        quota=$(aws_q 9999.0 service-quotas get-service-quota --service-code ec2 --quota-code "$code" \
            --query Quota.Value --output text 2>/dev/null || true)
        quota=${quota%.*}
        used=$(vcpus_in_use "$cls" "$SPOT")
        if [[ ! $quota =~ ^[0-9]+$ ]]; then
            say "check: the quota $code ($name) could not be read (Service Quotas): not checked"
        elif (( quota - used < need )); then
            failed+=("the $market vCPU quota '$name' ($code) in $REGION is $quota with $used in use, and $what needs $need: ask for $(( used + need )) (Service Quotas console, Amazon EC2, or aws service-quotas request-service-quota-increase --service-code ec2 --quota-code $code --desired-value $(( used + need )) --region $REGION); spot and on-demand quotas are separate (SPOT=$(( 1 - SPOT )) counts against the other)")
        else
            say "check: $market vCPUs: $what needs $need of '$name' ($code): $quota, $used in use"
        fi
    fi
    zones=$(aws_q "${REGION}a" ec2 describe-instance-type-offerings --location-type availability-zone --filters \
        "Name=instance-type,Values=$INSTANCE_TYPE" --query 'InstanceTypeOfferings[].Location' --output text 2>/dev/null || true)
    ZONES=$zones  # launch tries them in turn
    if [[ -z $zones ]]; then
        failed+=("$INSTANCE_TYPE is offered in no zone of $REGION: pick another REGION or INSTANCE_TYPE (aws ec2 describe-instance-type-offerings --location-type availability-zone --filters Name=instance-type,Values=$INSTANCE_TYPE --region <region>)")
    else
        say "check: $INSTANCE_TYPE is offered in $(wc -w <<< "$zones") zones of $REGION: ${zones//[[:space:]]/ }"
    fi
    if [[ -n $KEY_NAME ]] && ! aws_q "$KEY_NAME" ec2 describe-key-pairs --key-names "$KEY_NAME" --query 'KeyPairs[0].KeyName' \
            --output text >/dev/null 2>&1; then
        failed+=("no key pair $KEY_NAME in $REGION: aws ec2 create-key-pair --key-name $KEY_NAME --query KeyMaterial --output text > ~/.ssh/$KEY_NAME.pem (README step 1), or set KEY_NAME")
    fi
    local seen=" "
    for url in "$S3_DATA" "$S3_RUNS"; do  # the buckets in REGION (else every byte crosses regions) and readable
        [[ -n $url ]] || continue
        read -r bucket _ < <(s3_path "$url")
        [[ $seen != *" $bucket "* ]] || continue
        seen+="$bucket "
        where=$(aws_q "$REGION" s3api get-bucket-location --bucket "$bucket" --query LocationConstraint --output text 2>/dev/null) \
            || { failed+=("cannot reach the bucket $bucket ($url): check its name and that your user may read it (aws s3 ls s3://$bucket)"); continue; }
        [[ $where != None && $where != null ]] || where=us-east-1
        if [[ $where != "$REGION" ]]; then
            failed+=("the bucket $bucket is in $where, REGION is $REGION: set REGION=$where (or use a bucket in $REGION): across regions every byte is slower and costs \$0.02/GB")
        fi
    done
    if (( ${#failed[@]} > 0 )); then
        for line in "${failed[@]}"; do say "check: $line"; done
        die "${#failed[@]} thing$([[ ${#failed[@]} -gt 1 ]] && echo s) would stop this launch (above; CHECK=0 skips the check)"
    fi
    say "check: nothing in the way of $INSTANCE_TYPE ($market) in $REGION"
}

cmd_launch() {
    [[ -n $INSTANCE_TYPE ]] || die "set INSTANCE_TYPE, e.g. g6e.xlarge (README 'Choosing an instance')"
    [[ -n $KEY_NAME ]] || die "set KEY_NAME to an EC2 key pair of REGION (README 'From zero')"
    [[ -n $S3_DATA ]] || die "set S3_DATA (ImageNet: the Kaggle zip or a tree, and the shards prepare made), s3://bucket/path"
    [[ $PREPARE == 1 || -n $S3_RUNS ]] || die "set S3_RUNS (the run's backups), s3://bucket/path"
    code_ready
    local token="" live
    live=$(runs_of "$RUN")
    [[ -z $live ]] || die "RUN=$RUN has an instance already (${live//$'\n'/, }): two would write the same folder in S3; give this launch another RUN, or ./run_ec2.sh terminate that one first"
    if [[ $PREPARE == 1 && $FROM_KAGGLE == 1 ]]; then token=$(kaggle_ready); fi  # before anything is paid for
    if [[ $CHECK != 0 ]]; then cmd_check; fi
    local price how
    read -r price how < <(launch_price) || true
    if [[ -z ${price:-} ]]; then
        [[ -z $BUDGET_USD ]] || die "no price known for $INSTANCE_TYPE, and BUDGET_USD needs one: set HOURLY_USD"
        say "warning: no price known for $INSTANCE_TYPE: status and the log show no dollars (set HOURLY_USD)"
        price=0
    fi
    HOURLY_USD=$price
    if [[ -z $MAX_HOURS ]]; then  # a lifetime for every instance, whatever goes wrong on it
        if [[ $PREPARE == 1 ]]; then MAX_HOURS=$(( PREPARE_HOURS + 1 )); else MAX_HOURS=72; fi
        if [[ -n $BUDGET_USD && $price != 0 ]]; then
            MAX_HOURS=$(awk -v m="$MAX_HOURS" -v b="$BUDGET_USD" -v p="$price" 'BEGIN { h = b / p + 1; printf "%.1f", h < m ? h : m }')
        fi
    fi
    # shellcheck disable=SC2034  # user_data writes it into the instance's settings
    DEADLINE=$(awk -v h="$MAX_HOURS" -v t="$(date +%s)" 'BEGIN { printf "%d", t + h * 3600 }')
    local ami sg market=() home=$REMOTE_HOME id store_gb ebs_mbps ebs_iops data throughput iops ebs="VolumeType=gp3" role
    ami=$(aws_q ami-DRYRUN ssm get-parameter --name "$AMI_PARAM" --query Parameter.Value --output text) \
        || die "could not read the AMI from SSM parameter $AMI_PARAM in $REGION"
    type_facts
    [[ -n $TYPE_FACTS ]] || die "$INSTANCE_TYPE is not an instance type that EC2 knows in $REGION: check its name"
    read -r _ store_gb ebs_mbps ebs_iops <<< "$TYPE_FACTS"
    data=$( [[ $DRY_RUN == 1 ]] || data_gb )
    role=$(role_name)
    if [[ $PREPARE == 1 ]]; then  # the source's copy (the zip, or the tree) and a shard or two
        DISK_GB=${DISK_GB:-250}
        [[ -z $token ]] || KAGGLE_PARAM=/$role/kaggle-token  # read by this prepare's role alone, deleted at its end
        ensure_role "$role" "$(prepare_policy_json)"
        if [[ -n $token ]]; then  # a SecureString, written from a file only this user may read (not in `ps`)
            local tmp
            tmp=$(mktemp)
            printf '%s' "$token" > "$tmp"
            aws_q "" ssm put-parameter --name "$KAGGLE_PARAM" --type SecureString --overwrite --value "file://$tmp" \
                >/dev/null || { rm -f -- "$tmp"; die "could not store the Kaggle token in SSM ($KAGGLE_PARAM)"; }
            rm -f -- "$tmp"
            say "the Kaggle token is in the SSM SecureString parameter $KAGGLE_PARAM until prepare ends"
        fi
        ship_code "$SHARDS"
    else
        if [[ -z $data ]]; then  # no shards yet: data falls back to the zip, unzipped beside itself
            DISK_GB=${DISK_GB:-400}
            say "no shards in $S3_DATA: this instance copies the data itself, which takes long (run ./run_ec2.sh prepare once)"
        elif (( store_gb * 9 / 10 > data )); then DISK_GB=${DISK_GB:-100}  # the data goes on the instance store
        else DISK_GB=${DISK_GB:-$(( 100 + data ))}; fi
        ensure_role "$role" "$(policy_json)"
        ship_code "$S3_RUNS/$RUN"
    fi
    if (( store_gb == 0 )); then  # the data (or prepare's copy of the zip) on the root volume: as fast as the link
        throughput=$(( ebs_mbps < 1000 ? ebs_mbps : 1000 ))
        throughput=$(( throughput > 125 ? throughput : 125 ))
        iops=$(( ebs_iops < 16000 ? ebs_iops : 16000 ))
        iops=$(( iops > 3000 ? iops : 3000 ))
        ebs+=",Throughput=$throughput,Iops=$iops"
        say "$INSTANCE_TYPE has no instance store: the root volume gets gp3's $throughput MB/s and $iops IOPS (its EBS" \
            "link's baseline), which adds \$$(awk -v t="$throughput" -v i="$iops" 'BEGIN { printf "%.3f", ((t - 125) * 0.04 + (i - 3000) * 0.005) / 730 }')/h"
    fi
    sg=$(ensure_sg)
    if [[ $SPOT == 1 ]]; then
        market=(--instance-market-options 'MarketType=spot,SpotOptions={SpotInstanceType=one-time,InstanceInterruptionBehavior=terminate}')
    fi
    local ud
    ud=$(RUN_USER=$REMOTE_USER REPO="$home/resnet" OUT="$home/resnet/runs/$RUN" FORMAT_STORE=1 user_data)
    if [[ $DRY_RUN == 1 ]]; then printf '%s\n' "--- user-data ---" "$ud" "--- end of user-data ---" >&2; fi
    # IMDSv2 only (HttpTokens=required): this script's own calls use tokens; the instance ends itself on shutdown
    id=$(run_instance --image-id "$ami" --instance-type "$INSTANCE_TYPE" --key-name "$KEY_NAME" \
        --security-group-ids "$sg" --iam-instance-profile "Name=$role" "${market[@]}" \
        --instance-initiated-shutdown-behavior terminate --metadata-options "HttpTokens=required,HttpEndpoint=enabled" \
        --block-device-mappings "DeviceName=/dev/sda1,Ebs={VolumeSize=$DISK_GB,$ebs,DeleteOnTermination=true}" \
        --user-data "$ud" --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=$NAME_PREFIX-$RUN},{Key=run,Value=$RUN},{Key=made-by,Value=run_ec2.sh},{Key=hourly-usd,Value=$price},{Key=commit,Value=${CODE_COMMIT:0:12}}]")
    run mkdir -p "$STATE_DIR"
    if [[ $DRY_RUN != 1 ]]; then
        printf '%s\nHOURLY_USD=%s (%s)\nINSTANCE_TYPE=%s SPOT=%s BUDGET_USD=%s MAX_HOURS=%s KEEP_ALIVE=%s\n' "$id" "$price" \
            "$how" "$INSTANCE_TYPE" "$SPOT" "$BUDGET_USD" "$MAX_HOURS" "$KEEP_ALIVE" > "$(state_file)"
    fi
    say "the price counted: \$$price/h (${how:-none known}); it shuts down ${MAX_HOURS} h after its launch at the latest (MAX_HOURS)"
    if [[ $PREPARE == 1 ]]; then
        say "launched $id ($INSTANCE_TYPE, ${DISK_GB} GB gp3): it packs $S3_DATA into $SHARDS, copies its log there" \
            "(prepare.log) and terminates itself; an interrupted prepare resumes when launched again"
    else
        say "launched $id ($INSTANCE_TYPE, $([[ $SPOT == 1 ]] && echo spot || echo on-demand), ${DISK_GB} GB gp3) for run $RUN;" \
            "it sets up, stages the data and trains on its own, then backs up, writes ended.json and" \
            "$([[ $KEEP_ALIVE == 1 ]] && echo "stays up (KEEP_ALIVE=1: terminate it yourself)" || echo "terminates itself"):" \
            "./run_ec2.sh logs, ./run_ec2.sh ssh, ./run_ec2.sh terminate"
    fi
}

cmd_resume() {
    [[ -n $S3_RUNS ]] || die "set S3_RUNS: resume continues the run from its backup there"
    if [[ -z $INSTANCE_TYPE && -f $(state_file) ]]; then  # as the run's last launch from here: its type, market, budget
        local word words
        read -r -a words < <(sed -n 3p "$(state_file)")
        for word in "${words[@]}"; do
            case $word in
                INSTANCE_TYPE=*|SPOT=*) printf -v "${word%%=*}" '%s' "${word#*=}" ;;
                BUDGET_USD=*) [[ -n $BUDGET_USD ]] || BUDGET_USD=${word#*=} ;;
            esac
        done
        [[ -z $INSTANCE_TYPE ]] || say "as the run's last launch: INSTANCE_TYPE=$INSTANCE_TYPE SPOT=$SPOT${BUDGET_USD:+ BUDGET_USD=$BUDGET_USD} (give them to change them)"
    fi
    if [[ $DRY_RUN != 1 ]] && ! "$AWS" --region "$REGION" s3 ls "$S3_RUNS/$RUN/last.pt" >/dev/null 2>&1; then
        die "no $S3_RUNS/$RUN/last.pt: nothing to resume (RUN is the name of the run's folder)"
    fi
    if [[ -n $BUDGET_USD && $DRY_RUN != 1 ]]; then  # a new instance would only boot, see the budget spent, and end
        local spent
        spent=$("$AWS" --region "$REGION" s3 cp "$S3_RUNS/$RUN/spent.json" - 2>/dev/null | python3 -c \
            'import json, sys; print(round(sum(v["usd"] for v in json.load(sys.stdin).values()), 2))' 2>/dev/null || true)
        if [[ -n $spent ]] && awk -v s="$spent" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; then
            die "the run has spent \$$spent already (spent.json), which reaches BUDGET_USD=\$$BUDGET_USD: resume with a higher BUDGET_USD"
        fi
    fi
    say "$S3_RUNS/$RUN/last.pt found: launching a new instance that continues from it"
    cmd_launch
}

instance_ip() {
    aws_q 203.0.113.1 ec2 describe-instances --instance-ids "$(instance_id)" \
        --query 'Reservations[0].Instances[0].PublicIpAddress' --output text
}

ssh_cmd() { run ssh -i "$KEY_FILE" -o StrictHostKeyChecking=accept-new "$REMOTE_USER@$(instance_ip)" "$@"; }

cmd_logs() {  # every word of the remote command quoted: RUN and LINES_N are settings, not shell code
    local n=${LINES_N:-40}
    [[ $n =~ ^[0-9]+$ ]] || die "LINES_N must be a number of lines, got '$n'"
    if ! ssh_cmd "$(printf 'tail -n %s ~/resnet/runs/%q/train.log' "$n" "$RUN")"; then
        say "no log over SSH (ssh says why, above): the log of the last backup, $S3_RUNS/$RUN/train.log"
        run "$AWS" --region "$REGION" s3 cp "$S3_RUNS/$RUN/train.log" - | tail -n "$n"
    fi
}

cmd_status_remote() {  # status on the instance, with the settings launch gave it (its price, budget, OUT)
    # shellcheck disable=SC2016  # expanded there, not here
    ssh_cmd "$(printf 'if [ -r /etc/resnet-run.env ]; then set -a; . /etc/resnet-run.env; set +a; fi; cd ~/resnet && OUT=${OUT:-~/resnet/runs/%q} ./run_ec2.sh status' "$RUN")"
}

# shellcheck disable=SC2016  # a JMESPath query, not shell
cmd_list() {  # this tool's instances in REGION, found by their tags, not the laptop's state files
    local rows
    rows=$(aws_q "" ec2 describe-instances --filters Name=tag:made-by,Values=run_ec2.sh \
        Name=instance-state-name,Values=pending,running,stopping,stopped,shutting-down --output text --query \
        'Reservations[].Instances[].[Tags[?Key==`run`]|[0].Value, InstanceType, InstanceLifecycle, State.Name, LaunchTime, Tags[?Key==`hourly-usd`]|[0].Value, Tags[?Key==`commit`]|[0].Value, InstanceId]')
    python3 - "$rows" <<'PY'
import datetime, sys
rows = [line.split("\t") for line in sys.argv[1].splitlines() if line.strip()]
now = datetime.datetime.now(datetime.timezone.utc)
print(f"{'RUN':<28} {'type':<14} {'market':<9} {'state':<13} {'uptime':>8} {'$/h':>8}  {'commit':<12}  instance")
for run, kind, life, state, launched, price, commit, iid in rows:
    up = (now - datetime.datetime.fromisoformat(launched.replace("Z", "+00:00"))).total_seconds() / 3600
    market = "spot" if life == "spot" else "on-demand"
    print(f"{run:<28} {kind:<14} {market:<9} {state:<13} {up:>7.1f}h {price if price != 'None' else '?':>8}  "
          f"{commit:<12}  {iid}")
if not rows:
    print("(no instance of this tool in this region)")
PY
}

local_run() {  # runs/RUN on this machine, for what comes home from the run (made, and marked as the run's, if need
    # be): a folder that holds something else (a run trained here, another RUN's) is refused, never written into
    local dest=$REPO_DIR/runs/$RUN src=$S3_RUNS/$RUN
    if [[ -d $dest && -n $(ls -A "$dest" 2>/dev/null) && $(cat "$dest/results.source" 2>/dev/null) != "$src" ]]; then
        die "$dest holds something else than the run $src (no results.source naming it): move it away, or set RUN"
    fi
    if [[ $DRY_RUN != 1 ]]; then mkdir -p "$dest" && echo "$src" > "$dest/results.source"; fi
    echo "$dest"
}

cmd_curves() {  # the run's current curves.png here: over SSH (as it is now), else from its last backup in S3
    local dest
    dest=$(local_run)/curves.png
    if ! run scp -i "$KEY_FILE" -o StrictHostKeyChecking=accept-new \
            "$REMOTE_USER@$(instance_ip):$(printf 'resnet/runs/%q/curves.png' "$RUN")" "$dest"; then  # from its home
        say "no curves over SSH (scp says why, above): the last backup's, $S3_RUNS/$RUN/curves.png"
        run "$AWS" --region "$REGION" s3 cp "$S3_RUNS/$RUN/curves.png" "$dest" --only-show-errors \
            || die "no curves.png for $RUN yet: the run writes it after its first epoch"
    fi
    say "curves: $dest"
}

cmd_results() {  # the run's results from S3 into runs/RUN here: what its finish step made, and its records
    [[ -n $S3_RUNS ]] || die "set S3_RUNS: the results come from the run's folder there"
    local dest src=$S3_RUNS/$RUN
    dest=$(local_run)
    # the weights-only best.pt, eval/ (reports, Grad-CAM) and space/, then the run's own records beside them
    run "$AWS" --region "$REGION" s3 sync "$src/results" "$dest" --only-show-errors
    run "$AWS" --region "$REGION" s3 sync "$src" "$dest" --only-show-errors --exclude "*" --include log.jsonl \
        --include curves.png --include ended.json --include spent.json --include model_summary.txt
    [[ $DRY_RUN == 1 ]] && return 0
    [[ -f $dest/best.pt ]] || die "no results in $src/results yet: the run writes them when it ends done (or at its budget); ./run_ec2.sh status-remote says where it is"
    if [[ -d $dest/space/examples ]]; then rm -rf -- "$dest/examples"; cp -r "$dest/space/examples" "$dest/examples"; fi
    python3 - "$dest" <<'PY'
import json, os, sys
d = sys.argv[1]
def read(name):
    try:
        return json.load(open(os.path.join(d, name)))
    except (OSError, ValueError):
        return None
rows = []
for line in open(os.path.join(d, "log.jsonl")) if os.path.exists(os.path.join(d, "log.jsonl")) else []:
    try:
        rows.append(json.loads(line))
    except ValueError:
        pass
spent, ended = read("spent.json") or {}, read("ended.json") or {}
best = max(rows, key=lambda r: r["val_top1"]) if rows else None
print(f"results in {d}:")
if best:
    print(f"  best val top-1 {best['val_top1']:.2f}% (epoch {best['epoch'] + 1} of {rows[-1].get('epochs', '?')}), "
          f"top-5 {best.get('val_top5', float('nan')):.2f}%")
print(f"  {sum(v['hours'] for v in spent.values()):.2f} h on {len(spent)} instance(s), "
      f"${sum(v['usd'] for v in spent.values()):.2f}")
if ended:
    print(f"  the instance ended: {ended.get('status')}: {ended.get('why')}"
          + ("" if (ended.get("finish") or {}).get("ok", True) else f" (finish failed: {ended['finish']['failed']})"))
print(f"  the demo: python app.py --checkpoint {os.path.join(d, 'best.pt')}")
print(f"  the worst 32, with Grad-CAM: {os.path.join(d, 'eval', 'worst.html')}")
PY
}

# shellcheck disable=SC2016  # the commands that start the demo and TensorBoard expand on the instance
cmd_tunnel() {  # local ports to the instance's 127.0.0.1 over SSH: the demo (7860) and TensorBoard (6006) by default,
    # each started there first if nothing listens on its port (app.py on the run's best.pt, from the venv)
    local ports=("$@") forwards=() port start
    [[ ${#ports[@]} -gt 0 ]] || ports=(7860 6006)
    for port in "${ports[@]}"; do
        [[ $port =~ ^[0-9]+$ ]] || die "tunnel takes port numbers, got '$port'"
        forwards+=(-L "$port:127.0.0.1:$port")
    done
    start=$(printf 'cd ~/resnet && out=runs/%q && up() { ss -ltn 2>/dev/null | grep -q "127.0.0.1:$1 "; }; ' "$RUN")
    start+='if ! up 7860; then if [ -f "$out/best.pt" ]; then nohup .venv/bin/python app.py --checkpoint "$out/best.pt" --port 7860 > "$out/app.log" 2>&1 & echo "started app.py on $out/best.pt"; else echo "no best.pt yet: the demo starts once an epoch is done"; fi; fi; '
    start+='if ! up 6006; then if [ -x .venv/bin/tensorboard ]; then nohup .venv/bin/tensorboard --logdir runs --host 127.0.0.1 --port 6006 > "$out/tensorboard.log" 2>&1 & echo "started TensorBoard"; else echo "no TensorBoard: train with --tensorboard"; fi; fi'
    if [[ " ${ports[*]} " == *" 7860 "* || " ${ports[*]} " == *" 6006 "* ]]; then ssh_cmd "$start"; fi
    say "forwarding ${ports[*]} to the instance's 127.0.0.1 (only SSH is open): http://127.0.0.1:${ports[0]} here; Ctrl-C ends it"
    run ssh -i "$KEY_FILE" -o StrictHostKeyChecking=accept-new -o ExitOnForwardFailure=yes -N "${forwards[@]}" \
        "$REMOTE_USER@$(instance_ip)"
}

cmd_terminate() {  # the instance at once (no end step: `stop` on it ends the run with a checkpoint and a backup);
    # once it is gone, the run's own IAM role and profile, when this script made them and no instance of RUN is left
    local id profile
    id=$(instance_id)
    profile=$(aws_q None ec2 describe-instances --instance-ids "$id" --output text \
        --query 'Reservations[0].Instances[0].IamInstanceProfile.Arn' 2>/dev/null || true)
    aws_q "" ec2 terminate-instances --instance-ids "$id" --query 'TerminatingInstances[0].CurrentState.Name' --output text
    [[ $DRY_RUN == 1 ]] && return 0
    rm -f -- "$(state_file)"  # launch's record of it
    [[ -n $profile && $profile != None ]] || return 0
    say "waiting for $id to be gone, then removing its role ${profile##*/} (Ctrl-C keeps the role; launch reuses it)"
    if "$AWS" --region "$REGION" ec2 wait instance-terminated --instance-ids "$id" && [[ -z $(runs_of "$RUN") ]]; then
        remove_role "${profile##*/}"
    fi
}

main() {
    local sub=${1:-}
    [[ $# -gt 0 ]] && shift
    if [[ ${1:-} == --help || ${1:-} == -h ]]; then usage "$sub"; return 0; fi
    case $sub in
        setup) cmd_setup "$@" ;;
        prepare) cmd_prepare "$@" ;;
        data) cmd_data "$@" ;;
        train) cmd_train "$@" ;;
        restore) cmd_restore "$@" ;;
        node) cmd_node "$@" ;;
        backup) cmd_backup "$@" ;;
        watch-spot) cmd_watch_spot "$@" ;;
        budget) cmd_budget "$@" ;;
        watchdog) cmd_watchdog "$@" ;;
        end) cmd_end "$@" ;;
        bench) cmd_bench "$@" ;;
        status) cmd_status "$@" ;;
        stop) cmd_stop "$@" ;;
        launch) cmd_launch "$@" ;;
        resume) cmd_resume "$@" ;;
        ssh) ssh_cmd "$@" ;;
        logs) cmd_logs "$@" ;;
        status-remote) cmd_status_remote "$@" ;;
        check) cmd_check "$@" ;;
        list) cmd_list "$@" ;;
        curves) cmd_curves "$@" ;;
        results) cmd_results "$@" ;;
        finish) cmd_finish "$@" ;;
        terminate) cmd_terminate "$@" ;;
        tunnel) cmd_tunnel "$@" ;;
        -h|--help|help) usage ;;
        "") usage; return 2 ;;
        *) say "unknown subcommand '$sub'"; usage; return 2 ;;
    esac
}

main "$@"
