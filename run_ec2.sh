#!/usr/bin/env bash
# run_ec2.sh: from a laptop to a trained ResNet on EC2, and from a bare instance to a trained model, surviving
# spot reclaims and never paying for a run that cannot make progress.
#
# On the laptop (AWS CLI only):
#   ./run_ec2.sh launch            AMI, IAM role, security group, spot or on-demand instance, user-data that runs
#                                  setup, data and train (and again after a reboot); README "From zero"
#   ./run_ec2.sh ssh | logs | status-remote | terminate
#   ./run_ec2.sh tunnel [PORT ...] app.py's page and TensorBoard on the instance, here (ports 7860, 6006)
#   ./run_ec2.sh resume            a new instance for a run whose instance was reclaimed: it continues from S3
#   ./run_ec2.sh prepare           once: ImageNet in S3_DATA into checked tar shards beside it (or PREPARE=1 launch)
# On the instance:
#   ./run_ec2.sh setup             venv + requirements; check the commands, the GPUs and shared memory
#   ./run_ec2.sh data              the shards from S3 onto the instance store (DATA_DIR), while setup runs
#   ./run_ec2.sh train [flags]     torchrun train.py on every GPU, in tmux, restarted after a preemption or a crash
#                                  that made progress; starts the S3 backup, the spot watcher and the budget guard
#   ./run_ec2.sh bench             bench.py on this GPU and these JPEGs: the projected hours and dollars
#   ./run_ec2.sh status | stop
#
# Every setting is an environment variable; the defaults are below. DRY_RUN=1 prints each command instead.
set -euo pipefail

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
BUDGET_USD=${BUDGET_USD:-}                           # stop the run (cleanly) once the instance has cost this much
SESSION=${SESSION:-resnet}                           # tmux session name
MAX_RESTARTS=${MAX_RESTARTS:-50}                     # the restart loop gives up after this many
RESTART_DELAY_S=${RESTART_DELAY_S:-10}               # pause before a restart
IMDS_URL=${IMDS_URL:-http://169.254.169.254}         # instance metadata service (tests point it at 127.0.0.1)
SPOT_POLL_S=${SPOT_POLL_S:-5}                        # seconds between spot notice polls
BUDGET_POLL_S=${BUDGET_POLL_S:-60}                   # seconds between budget checks
MIN_SHM_GB=${MIN_SHM_GB:-8}                          # DataLoader workers pass batches through /dev/shm
TRAIN_CMD=${TRAIN_CMD:-}                             # replaces "torchrun ... train.py" (tests use a stand-in)
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
NEEDED=${NEEDED:-git curl tmux unzip python3 aws}    # the commands setup checks for
DRY_RUN=${DRY_RUN:-0}                                # 1: print the commands, run nothing
# launch (on the laptop)
INSTANCE_TYPE=${INSTANCE_TYPE:-}                     # e.g. g6e.xlarge or p5.4xlarge: README "Choosing an instance"
SPOT=${SPOT:-1}                                      # 1: a spot instance, 0: on-demand
DISK_GB=${DISK_GB:-}                                 # gp3 root volume; default 100 GB (the venv, the checkpoints)
                                                     # where the data goes on the instance store, else 250 (it too)
PREPARE=${PREPARE:-0}                                # launch: 1 makes an instance (a CPU type) that runs prepare and
                                                     # terminates itself
REGION=${REGION:-${AWS_DEFAULT_REGION:-us-east-1}}
KEY_NAME=${KEY_NAME:-}                               # an EC2 key pair for ssh
KEY_FILE=${KEY_FILE:-$HOME/.ssh/$KEY_NAME.pem}
REPO_URL=${REPO_URL:-}                               # what the instance clones; default: this checkout's origin
TRAIN_ARGS=${TRAIN_ARGS:-}                           # train.py flags for the launched run, e.g. "--epochs 16"
# the run's name: runs/RUN on the instance, S3_RUNS/RUN in S3; by default, what it trains, as train.py names its
# folder (<the data's folder name>-<arch>): an Imagenette try-out and the ImageNet run never share a folder
[[ $TRAIN_ARGS =~ --arch[=\ ]+([a-z0-9]+) ]] && ARCH=${BASH_REMATCH[1]} || ARCH=resnet50
if [[ -n ${OUT:-} ]]; then default_run=$(basename "$OUT"); else default_run=$(basename "${S3_DATA:-$DATA_DIR}")-$ARCH; fi
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
          RESTART_DELAY_S IMDS_URL SPOT_POLL_S BUDGET_POLL_S MIN_SHM_GB TRAIN_CMD AWS DRY_RUN PATH)
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
        prepare) echo "prepare: once per dataset, S3_DATA (the Kaggle zip or a tree) into tar shards of about 1 GB under SHARDS (default S3_DATA/shards-<SHRINK_BY><SHRINK>, shards-shorter320; S3_DATA/shards with SHRINK= for full size), every image decoded once on the way, the training images shrunk to SHRINK px; resumes. On a laptop, or on a CPU instance: PREPARE=1 INSTANCE_TYPE=c7i.4xlarge ./run_ec2.sh launch." ;;
        data) echo "data: DATA_DIR onto the instance store (formatted only when launch's user-data sets FORMAT_STORE=1; striped over several disks; one the AMI mounted is used as it is), then the shards under S3_DATA streamed into it, checked against their sha256 (SHARDS where they fit, else the smallest that do); with no shards, the zip or the tree copied and train.py --check-data." ;;
        train) echo "train [train.py flags]: torchrun --nproc_per_node=<GPUs> train.py --data DATA_DIR --out OUT [flags] in tmux session SESSION (nohup without tmux), every setting passed explicitly, output to OUT/train.log. Restarted after 'preempted', and after 'crashed' only when last.pt moved on since the start; stopped on done, a config error, or BUDGET_USD. Starts the S3 backup and the spot watcher (S3_RUNS) and the budget guard (BUDGET_USD). With no OUT/last.pt it first restores OUT from S3_RUNS." ;;
        backup) echo "backup: aws s3 sync OUT to S3_RUNS/<name of OUT> every BACKUP_MIN minutes while training runs, and once more at the end (train starts it)." ;;
        watch-spot) echo "watch-spot: poll IMDS_URL (IMDSv2) every SPOT_POLL_S seconds; on a spot interruption notice, SIGTERM the trainer (train.py checkpoints) and back up to S3_RUNS, which it requires (train starts it)." ;;
        budget) echo "budget: every BUDGET_POLL_S seconds, the money spent since launch (HOURLY_USD) against BUDGET_USD: a warning in the log when the projection to the last epoch passes it, a clean stop when the spending reaches it (train starts it)." ;;
        bench) echo "bench: python bench.py --device cuda on the JPEGs of DATA_DIR for this instance's type (IMDS), with HOURLY_USD: this GPU's and this machine's loader's rates, and the projected hours and dollars with them in place of the published rates." ;;
        status) echo "status: GPU use, the last log line, epoch and top-1, and the cost since the instance's launch (IMDS; uptime as the fallback) with the projection to the last epoch and BUDGET_USD." ;;
        stop) echo "stop: SIGTERM the trainer (it checkpoints) and end the tmux session." ;;
        launch) echo "launch: from INSTANCE_TYPE, SPOT, DISK_GB, S3_DATA, S3_RUNS, REPO_URL, KEY_NAME, REGION (and RUN, TRAIN_ARGS, HOURLY_USD, BUDGET_USD): the Deep Learning AMI from SSM (AMI_PARAM), an IAM role that reads S3_DATA and writes S3_RUNS, a security group open to MY_IP's SSH only, the instance, and user-data that runs setup, data and train on every boot (systemd)." ;;
        resume) echo "resume: launch a new instance for RUN, which must have a last.pt in S3_RUNS/RUN: train restores it and continues." ;;
        ssh|logs|status-remote|terminate) echo "ssh | logs | status-remote | terminate: log in to RUN's instance, print its last log lines (over SSH, else from S3_RUNS), run status there, or terminate it." ;;
        tunnel) echo "tunnel [PORT ...]: forward local ports (default 7860 and 6006) to RUN's instance's 127.0.0.1 over SSH: app.py's page and TensorBoard, which listen there only; the security group stays SSH-only." ;;
        *) sed -n '2,/^# Every setting/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' ;;
    esac
}

gpu_count() {
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | grep -c '^GPU' || true; else echo 0; fi
}

python_bin() { if [[ -x $VENV/bin/python ]]; then echo "$VENV/bin/python"; else echo python3; fi; }

alive() { [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null; }

trainer_pid() {
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if alive "$pid"; then echo "$pid"; fi
}

backup_once() {
    if [[ -z $S3_RUNS ]]; then say "S3_RUNS is not set: no backup"; return 0; fi
    run "$AWS" s3 sync "$OUT" "$S3_RUNS/$(basename "$OUT")" --only-show-errors --exclude "*.tmp"
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

settings_env() {  # NAME=value for every setting that is set, one a line
    local name
    for name in "${SETTINGS[@]}" "${AWS_SETTINGS[@]}"; do
        if [[ -n ${!name+x} ]]; then printf '%s=%s\n' "$name" "${!name}"; fi
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
    if [[ $DRY_RUN != 1 ]] && python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        say "a CUDA torch is installed system-wide: reusing it"
        [[ -x $VENV/bin/python ]] || run python3 -m venv --system-site-packages "$VENV"
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
    [[ -n $S3_DATA ]] || die "set S3_DATA=s3://bucket/path of ImageNet (a train/ val/ tree or the Kaggle zip)"
    local flags=()
    [[ -z $SHRINK ]] || flags+=(--shrink "$SHRINK" --shrink-by "$SHRINK_BY")
    run "$(python_bin)" "$REPO_DIR/shards.py" pack "$S3_DATA" "$SHARDS" "${flags[@]}" ${PREPARE_SRC:+--scratch "$PREPARE_SRC"}
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
    local gpus words
    gpus=$(gpu_count)
    if [[ -n $TRAIN_CMD ]]; then read -r -a words <<< "$TRAIN_CMD"; printf '%s\n' "${words[@]}"; else
        printf '%s\n' torchrun "--nproc_per_node=$(( gpus > 0 ? gpus : 1 ))" "$REPO_DIR/train.py" --data "$DATA_DIR"
        if [[ $HOURLY_USD != 0 ]]; then printf '%s\n' --hourly-usd "$HOURLY_USD"; fi
    fi
}

ckpt_stamp() { stat -c '%Y %s' "$OUT/last.pt" 2>/dev/null || echo none; }

last_error() {  # the last line of the log that says what went wrong
    local line
    line=$(grep -E 'error|Error|ERROR' "$LOG" 2>/dev/null | tail -n 1 || true)
    printf '%s' "${line:-$(grep -v '^[[:space:]]*$' "$LOG" 2>/dev/null | tail -n 1 || true)}"
}

HELPERS=()
start_helpers() {  # the backup, the spot watcher and the budget guard, for as long as the loop runs
    local self=$REPO_DIR/run_ec2.sh
    if [[ -n $S3_RUNS ]]; then
        "$self" backup >> "$OUT/backup.log" 2>&1 &
        HELPERS+=("$!")
        "$self" watch-spot >> "$OUT/watch-spot.log" 2>&1 &
        HELPERS+=("$!")
    else
        say "warning: S3_RUNS is not set: nothing is backed up, and a spot reclaim takes the disk with it"
    fi
    if [[ -n $BUDGET_USD ]]; then
        "$self" budget >> "$LOG" 2>&1 &
        HELPERS+=("$!")
    fi
}

stop_helpers() {  # TERM each one; the backup syncs once more on its way out, and the spot watcher finishes its own
    local pid
    if [[ -f $OUT/spot_notice ]]; then sleep 1; fi
    for pid in "${HELPERS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${HELPERS[@]}"; do wait "$pid" 2>/dev/null || true; done
}

train_loop() {
    local restarts=0 code status before cmd
    mapfile -t cmd < <(trainer_cmd)
    echo $$ > "$OUT/loop.pid"
    rm -f "$OUT/spot_notice" "$OUT/budget_stop"
    start_helpers
    trap stop_helpers EXIT
    while true; do
        if [[ -n $BUDGET_USD ]] && budget_spent; then
            echo stopped > "$OUT/status"
            say "not starting: \$$(money spent) of BUDGET_USD=\$$BUDGET_USD spent; raise BUDGET_USD to continue"
            return 0
        fi
        rm -f "$OUT/status"
        mark train_start
        wait_report >> "$LOG"  # where train.py's "first step at" line follows
        before=$(ckpt_stamp)
        "${cmd[@]}" --out "$OUT" "$@" >> "$LOG" 2>&1 &
        echo $! > "$PIDFILE"
        code=0
        wait $! || code=$?
        status=$(cat "$OUT/status" 2>/dev/null || echo crashed)
        if [[ -f $OUT/budget_stop ]]; then
            echo stopped > "$OUT/status"
            say "training stopped at BUDGET_USD=\$$BUDGET_USD (checkpointed; backed up); raise it to continue"
            return 0
        fi
        if [[ -f $OUT/spot_notice ]]; then say "spot interruption: not restarting on an instance about to go"; return 0; fi
        case $status in
            done|stopped) say "training $status"; return 0 ;;
            bad_input) say "training stopped: a config error: $(last_error)"; return 2 ;;
            diverged) say "training stopped: the loss diverged: $(last_error)"; return 3 ;;
            crashed)
                if [[ $(ckpt_stamp) == "$before" ]]; then
                    say "training crashed (exit $code) with no progress since its start (last.pt did not move on), so a restart would fail the same way: $(last_error)"
                    return 1
                fi ;;
        esac
        restarts=$((restarts + 1))
        if [[ $restarts -gt $MAX_RESTARTS ]]; then say "giving up after $MAX_RESTARTS restarts"; return 1; fi
        say "training $status (exit $code): restart $restarts in ${RESTART_DELAY_S}s"
        sleep "$RESTART_DELAY_S"
    done
}

checkpoint_flags() {  # the training flags of OUT/last.pt's command line, one a line, but those this script sets
    [[ -f $OUT/last.pt ]] || return 0
    PYTHONPATH=$REPO_DIR "$(python_bin)" - "$OUT/last.pt" <<'PY'
import sys
import model
argv, own, i = model.read_checkpoint(sys.argv[1])["argv"] or [], ("--data", "--out", "--hourly-usd", "--resume"), 0
while i < len(argv):
    if argv[i].split("=")[0] in own:
        i += 1 if "=" in argv[i] else 2
        continue
    print(argv[i])
    i += 1
PY
}

cmd_train() {
    run mkdir -p "$OUT"
    if [[ ! -f $OUT/last.pt && -n $S3_RUNS ]]; then
        say "no local checkpoint: restoring $S3_RUNS/$(basename "$OUT")"
        run "$AWS" s3 sync "$S3_RUNS/$(basename "$OUT")" "$OUT" --only-show-errors
    fi
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
    local self=$REPO_DIR/run_ec2.sh env_words
    mapfile -t env_words < <(settings_env)
    if [[ ${FOREGROUND:-0} == 1 ]]; then
        train_loop "$@"
    elif command -v tmux >/dev/null 2>&1; then
        # every setting on the command line: a tmux server that already runs gives new sessions its own environment
        run tmux new-session -d -s "$SESSION" "$(printf '%q ' env "${env_words[@]}" FOREGROUND=1 "$self" train "$@")"
        say "training in tmux session '$SESSION' (tmux attach -t $SESSION); log: $LOG"
    else
        run nohup env "${env_words[@]}" FOREGROUND=1 "$self" train "$@" >> "$OUT/loop.log" 2>&1 &
        say "training under nohup; log: $LOG"
    fi
}

training_active() {  # the restart loop or the trainer runs
    alive "$(cat "$OUT/loop.pid" 2>/dev/null || true)" || [[ -n $(trainer_pid) ]]
}

cmd_backup() {
    trap 'backup_once; exit 0' TERM
    while true; do
        backup_once
        training_active || break
        sleep $((BACKUP_MIN * 60)) &
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
    # since its launch, the run's dollars (OUT/spent.json adds its earlier instances: it travels with the run
    # through S3_RUNS, and each instance updates its own entry), the projection to the last epoch (log.jsonl)
    local launched source id
    read -r launched source < <(launch_time)
    id=$(imds_get meta-data/instance-id)
    python3 - "$OUT" "$HOURLY_USD" "$launched" "$source" "${id:-$(hostname)}" <<'PY'
import json, os, sys, time
out, price, launched, source, me = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
log, record_path = os.path.join(out, "log.jsonl"), os.path.join(out, "spent.json")
rows = [json.loads(line) for line in open(log) if line.strip()] if os.path.exists(log) else []
hours = (time.time() - launched) / 3600
record = json.load(open(record_path)) if os.path.exists(record_path) else {}
record[me] = dict(hours=round(hours, 4), hourly_usd=price, usd=round(hours * price, 4))
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

money() {  # one field of costs(): what the run has spent, or its projection
    local hours mine spent projected rest
    read -r hours mine spent projected rest < <(costs)
    case $1 in spent) echo "$spent" ;; projected) echo "$projected" ;; hours) echo "$hours" ;; esac
}

budget_spent() { awk -v s="$(money spent)" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; }

cmd_budget() {
    [[ -n $BUDGET_USD ]] || die "set BUDGET_USD, the most this run may cost"
    [[ $HOURLY_USD != 0 ]] || die "set HOURLY_USD to the instance's price: the budget needs it"
    local warned=0 spent projected pid
    while true; do
        read -r _ _ spent projected _ < <(costs)
        if [[ $warned == 0 ]] && awk -v p="$projected" -v b="$BUDGET_USD" 'BEGIN { exit !(p > b) }'; then
            say "warning: the projected cost to the last epoch, \$$projected, passes BUDGET_USD=\$$BUDGET_USD; the run will stop at \$$BUDGET_USD"
            warned=1
        fi
        if awk -v s="$spent" -v b="$BUDGET_USD" 'BEGIN { exit !(s >= b) }'; then
            say "budget reached: \$$spent of BUDGET_USD=\$$BUDGET_USD spent: stopping the trainer (it checkpoints)"
            touch "$OUT/budget_stop"
            pid=$(trainer_pid)
            if [[ -n $pid ]]; then
                kill -TERM "$pid"
                for _ in $(seq 300); do alive "$pid" || break; sleep 1; done
            fi
            return 0
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
events = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
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
    local pid hours spent projected left per_epoch source
    pid=$(trainer_pid)
    echo "trainer: ${pid:+running (pid $pid)}${pid:-not running}; status file: $(cat "$OUT/status" 2>/dev/null || echo none)"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv,noheader
    fi
    [[ -f $LOG ]] && echo "last log line: $(tail -n 1 "$LOG")"
    if [[ -f $OUT/log.jsonl ]]; then
        "$(python_bin)" - "$OUT/log.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"epoch {rows[-1]['epoch'] + 1}: val top-1 {rows[-1]['val_top1']:.2f}% (best {max(r['val_top1'] for r in rows):.2f}%)")
PY
    fi
    read -r hours mine spent projected left per_epoch source < <(costs)
    local earlier=""
    if [[ $mine != "$spent" ]]; then earlier="; the run, with its earlier instances (spent.json): \$${spent}"; fi
    echo "cost: the instance has run ${hours} h since its launch (from ${source}): \$${mine} at \$${HOURLY_USD}/h${earlier};" \
         "projected \$${projected} to the last epoch (${left} left at ${per_epoch} min each)${BUDGET_USD:+; BUDGET_USD \$$BUDGET_USD}"
    wait_report
}

cmd_stop() {
    local pid
    pid=$(trainer_pid)
    if [[ -n $pid ]]; then run kill -TERM "$pid"; say "sent SIGTERM to the trainer (pid $pid): it checkpoints"; fi
    if command -v tmux >/dev/null 2>&1 && tmux has-session -t "$SESSION" 2>/dev/null; then
        # the loop sees 'preempted' and would restart: end its session once the trainer is gone
        if [[ -n $pid ]]; then for _ in $(seq 60); do alive "$pid" || break; sleep 1; done; fi
        run tmux kill-session -t "$SESSION"
    fi
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

policy_json() {  # the training instance's role may read S3_DATA, read and write S3_RUNS, and nothing else
    local rb rp
    read -r rb rp < <(s3_path "$S3_RUNS")
    cat <<JSON
{"Version": "2012-10-17", "Statement": [
$(read_data_json)
  {"Sid": "ListRuns", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::$rb",
   "Condition": {"StringLike": {"s3:prefix": ["${rp:-*}", "${rp:+$rp/*}"]}}},
  {"Sid": "ReadWriteRuns", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
   "Resource": "arn:aws:s3:::$rb/${rp:+$rp/}*"}
]}
JSON
}

prepare_policy_json() {  # prepare's instance may read S3_DATA and write SHARDS (multipart uploads too), nothing else
    local sb sp
    read -r sb sp < <(s3_path "$SHARDS")
    cat <<JSON
{"Version": "2012-10-17", "Statement": [
$(read_data_json)
  {"Sid": "ListUploads", "Effect": "Allow", "Action": "s3:ListBucketMultipartUploads", "Resource": "arn:aws:s3:::$sb"},
  {"Sid": "WriteShards", "Effect": "Allow", "Action": ["s3:PutObject", "s3:AbortMultipartUpload",
   "s3:ListMultipartUploadParts"], "Resource": "arn:aws:s3:::$sb/$sp/*"}
]}
JSON
}

TRUST_JSON='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}'

exists() {  # an AWS lookup that succeeds; under DRY_RUN nothing exists yet, so every creation is printed
    [[ $DRY_RUN != 1 ]] && "$AWS" --region "$REGION" "$@" >/dev/null 2>&1
}

ensure_role() {  # role $1 with inline policy $2 (rewritten each launch: the prefixes may have changed), its profile
    local role=$1
    if ! exists iam get-role --role-name "$role"; then
        aws_q "" iam create-role --role-name "$role" --assume-role-policy-document "$TRUST_JSON" >/dev/null
    fi
    aws_q "" iam put-role-policy --role-name "$role" --policy-name "$role-s3" --policy-document "$2" >/dev/null
    if ! exists iam get-instance-profile --instance-profile-name "$role"; then
        aws_q "" iam create-instance-profile --instance-profile-name "$role" >/dev/null
        aws_q "" iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role" >/dev/null
    fi
}

ensure_sg() {  # a security group that lets SSH in from MY_IP only; prints its id
    local ip=$MY_IP sg
    if [[ -z $ip ]]; then
        ip=$(curl -s -f --max-time 5 https://checkip.amazonaws.com | tr -d '[:space:]') || die "could not find this machine's public IP; set MY_IP"
    fi
    if exists ec2 describe-security-groups --group-names "$NAME_PREFIX"; then
        sg=$("$AWS" --region "$REGION" ec2 describe-security-groups --group-names "$NAME_PREFIX" \
            --query 'SecurityGroups[0].GroupId' --output text)
    else
        sg=$(aws_q sg-DRYRUN ec2 create-security-group --group-name "$NAME_PREFIX" \
            --description "SSH to run_ec2.sh instances" --query GroupId --output text)
    fi
    if [[ $DRY_RUN == 1 ]]; then
        aws_q "" ec2 authorize-security-group-ingress --group-id "$sg" --protocol tcp --port 22 --cidr "$ip/32" >/dev/null
    else  # fails when the rule is there already, from an earlier launch
        "$AWS" --region "$REGION" ec2 authorize-security-group-ingress --group-id "$sg" --protocol tcp --port 22 \
            --cidr "$ip/32" >/dev/null 2>&1 || true
    fi
    echo "$sg"
}

user_data() {  # the instance's boot script: RUN_USER runs setup, data and train now and after every reboot
    local name
    cat <<'EOF'
#!/bin/bash
# run_ec2.sh launch's user-data: a systemd service that runs setup, data and train as RUN_USER, now and after every
# reboot; each step is idempotent, so a reboot (or `run_ec2.sh resume` on a new instance) picks up where it was.
# BOOT_ROOT and SYSTEMCTL let a test run this file on a machine that is not the instance.
set -euo pipefail
BOOT_ROOT=${BOOT_ROOT:-}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
mkdir -p "$BOOT_ROOT/etc" "$BOOT_ROOT/usr/local/bin" "$BOOT_ROOT/etc/systemd/system"
cat > "$BOOT_ROOT/etc/resnet-run.env" <<'ENV'
EOF
    for name in RUN_USER REPO_URL REPO DATA_DIR S3_DATA S3_RUNS OUT HOURLY_USD BUDGET_USD TRAIN_ARGS PREPARE SHARDS \
                SHRINK SHRINK_BY FORMAT_STORE; do
        printf '%s=%q\n' "$name" "${!name}"
    done
    cat <<'EOF'
ENV
cat > "$BOOT_ROOT/usr/local/bin/resnet-run" <<SCRIPT
#!/bin/bash
set -euo pipefail
set -a
# shellcheck source=/dev/null
. "$BOOT_ROOT/etc/resnet-run.env"
set +a
SCRIPT
cat >> "$BOOT_ROOT/usr/local/bin/resnet-run" <<'SCRIPT'
[ -d "$REPO/.git" ] || git clone --quiet "$REPO_URL" "$REPO"
cd "$REPO"
if [ "$PREPARE" = 1 ]; then  # a CPU instance that makes the shards once, keeps its log beside them, and goes
    trap '${SHUTDOWN:-sudo shutdown -h now}' EXIT  # it terminates on shutdown: it costs nothing once done
    ./run_ec2.sh setup
    ./run_ec2.sh prepare 2>&1 | tee "$HOME/prepare.log" || true
    aws s3 cp "$HOME/prepare.log" "$SHARDS/prepare.log" --only-show-errors || true
    exit 0
fi
data_pid=""
if [ ! -f "$DATA_DIR/.run_ec2_data_done" ]; then ./run_ec2.sh data & data_pid=$!; fi  # the shards stream in while
./run_ec2.sh setup                                                                     # setup installs
if [ -n "$data_pid" ]; then wait "$data_pid"; touch "$DATA_DIR/.run_ec2_data_done"; fi
read -r -a flags <<< "$TRAIN_ARGS"
FOREGROUND=1 exec ./run_ec2.sh train "${flags[@]}"
SCRIPT
chmod +x "$BOOT_ROOT/usr/local/bin/resnet-run"
# shellcheck source=/dev/null
. "$BOOT_ROOT/etc/resnet-run.env"
cat > "$BOOT_ROOT/etc/systemd/system/resnet-run.service" <<UNIT
[Unit]
Description=run_ec2.sh: setup, data and train (or prepare)
After=network-online.target
Wants=network-online.target
[Service]
Type=simple
User=$RUN_USER
ExecStart=/usr/local/bin/resnet-run
Restart=no
[Install]
WantedBy=multi-user.target
UNIT
"$SYSTEMCTL" daemon-reload
"$SYSTEMCTL" enable --now resnet-run.service
EOF
}

state_file() { echo "$STATE_DIR/$RUN.instance"; }

instance_id() {
    [[ -f $(state_file) ]] || die "no instance recorded for RUN=$RUN in $STATE_DIR; launch one first"
    cat "$(state_file)"
}

instance_disks() {  # "instance-store-GB EBS-MB/s EBS-IOPS" of INSTANCE_TYPE: its baselines (DescribeInstanceTypes)
    aws_q "250 125 3000" ec2 describe-instance-types --instance-types "$INSTANCE_TYPE" --output text --query \
        'InstanceTypes[0].[InstanceStorageInfo.TotalSizeInGB,EbsInfo.EbsOptimizedInfo.BaselineThroughputInMBps,EbsInfo.EbsOptimizedInfo.BaselineIops]' \
        | awk '{printf "%d %d %d\n", ($1 == "None" ? 0 : $1), $2, $3}'
}

data_gb() {  # GB of the smallest complete shards under S3_DATA (what data stages, at worst), or nothing
    local picked
    picked=$(pick_shards 0)
    [[ -z $picked ]] || echo $(( ${picked#* } / 1000000000 + 1 ))
}

cmd_launch() {
    [[ -n $INSTANCE_TYPE ]] || die "set INSTANCE_TYPE, e.g. g6e.xlarge (README 'Choosing an instance')"
    [[ -n $KEY_NAME ]] || die "set KEY_NAME to an EC2 key pair of REGION (README 'From zero')"
    [[ -n $S3_DATA ]] || die "set S3_DATA (ImageNet: the Kaggle zip or a tree, and the shards prepare made), s3://bucket/path"
    [[ $PREPARE == 1 || -n $S3_RUNS ]] || die "set S3_RUNS (the run's backups), s3://bucket/path"
    if [[ -z $REPO_URL ]]; then
        REPO_URL=$(git -C "$REPO_DIR" remote get-url origin 2>/dev/null) || die "set REPO_URL: what the instance clones"
    fi
    local ami sg market=() home=$REMOTE_HOME id store_gb ebs_mbps ebs_iops data throughput iops ebs="VolumeType=gp3"
    ami=$(aws_q ami-DRYRUN ssm get-parameter --name "$AMI_PARAM" --query Parameter.Value --output text) \
        || die "could not read the AMI from SSM parameter $AMI_PARAM in $REGION"
    read -r store_gb ebs_mbps ebs_iops < <(instance_disks)
    data=$( [[ $DRY_RUN == 1 ]] || data_gb )
    if [[ $PREPARE == 1 ]]; then  # the source's copy (the zip, or the tree) and a shard or two
        DISK_GB=${DISK_GB:-250}
        ensure_role "$NAME_PREFIX-prepare" "$(prepare_policy_json)"
    else
        if [[ -z $data ]]; then  # no shards yet: data falls back to the zip, unzipped beside itself
            DISK_GB=${DISK_GB:-400}
            say "no shards in $S3_DATA: this instance copies the data itself, which takes long (run ./run_ec2.sh prepare once)"
        elif (( store_gb * 9 / 10 > data )); then DISK_GB=${DISK_GB:-100}  # the data goes on the instance store
        else DISK_GB=${DISK_GB:-$(( 100 + data ))}; fi
        ensure_role "$NAME_PREFIX" "$(policy_json)"
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
    for attempt in 1 2 3 4 5 6; do  # a new instance profile takes a few seconds to be usable
        id=$(aws_q i-DRYRUN ec2 run-instances --image-id "$ami" --instance-type "$INSTANCE_TYPE" --key-name "$KEY_NAME" \
            --security-group-ids "$sg" --iam-instance-profile "Name=$NAME_PREFIX$([[ $PREPARE == 1 ]] && echo -prepare)" \
            "${market[@]}" --instance-initiated-shutdown-behavior terminate \
            --block-device-mappings "DeviceName=/dev/sda1,Ebs={VolumeSize=$DISK_GB,$ebs,DeleteOnTermination=true}" \
            --user-data "$ud" --tag-specifications "ResourceType=instance,Tags=[{Key=Name,Value=$NAME_PREFIX-$RUN},{Key=run,Value=$RUN}]" \
            --query 'Instances[0].InstanceId' --output text) && break
        [[ $attempt == 6 ]] && die "run-instances failed (see above): capacity, a quota, or the instance profile"
        sleep 5
    done
    run mkdir -p "$STATE_DIR"
    if [[ $DRY_RUN != 1 ]]; then echo "$id" > "$(state_file)"; fi
    if [[ $PREPARE == 1 ]]; then
        say "launched $id ($INSTANCE_TYPE, ${DISK_GB} GB gp3): it packs $S3_DATA into $SHARDS, copies its log there" \
            "(prepare.log) and terminates itself; an interrupted prepare resumes when launched again"
    else
        say "launched $id ($INSTANCE_TYPE, $([[ $SPOT == 1 ]] && echo spot || echo on-demand), ${DISK_GB} GB gp3) for run $RUN;" \
            "it sets up, stages the data and trains on its own: ./run_ec2.sh logs, ./run_ec2.sh ssh, ./run_ec2.sh terminate"
    fi
}

cmd_resume() {
    [[ -n $S3_RUNS ]] || die "set S3_RUNS: resume continues the run from its backup there"
    if [[ $DRY_RUN != 1 ]] && ! "$AWS" --region "$REGION" s3 ls "$S3_RUNS/$RUN/last.pt" >/dev/null 2>&1; then
        die "no $S3_RUNS/$RUN/last.pt: nothing to resume (RUN is the name of the run's folder)"
    fi
    say "$S3_RUNS/$RUN/last.pt found: launching a new instance that continues from it"
    cmd_launch
}

instance_ip() {
    aws_q 203.0.113.1 ec2 describe-instances --instance-ids "$(instance_id)" \
        --query 'Reservations[0].Instances[0].PublicIpAddress' --output text
}

ssh_cmd() { run ssh -i "$KEY_FILE" -o StrictHostKeyChecking=accept-new "$REMOTE_USER@$(instance_ip)" "$@"; }

cmd_logs() {
    ssh_cmd "tail -n ${LINES_N:-40} ~/resnet/runs/$RUN/train.log" 2>/dev/null \
        || { say "no SSH to the instance: the log of the last backup"; run "$AWS" --region "$REGION" s3 cp "$S3_RUNS/$RUN/train.log" - | tail -n "${LINES_N:-40}"; }
}

cmd_tunnel() {  # local ports to the instance's 127.0.0.1 over SSH: the demo (7860) and TensorBoard (6006) by default
    local ports=("$@") forwards=() port
    [[ ${#ports[@]} -gt 0 ]] || ports=(7860 6006)
    for port in "${ports[@]}"; do
        [[ $port =~ ^[0-9]+$ ]] || die "tunnel takes port numbers, got '$port'"
        forwards+=(-L "$port:127.0.0.1:$port")
    done
    say "forwarding ${ports[*]} to the instance's 127.0.0.1 (only SSH is open): http://127.0.0.1:${ports[0]} here; Ctrl-C ends it"
    run ssh -i "$KEY_FILE" -o StrictHostKeyChecking=accept-new -o ExitOnForwardFailure=yes -N "${forwards[@]}" \
        "$REMOTE_USER@$(instance_ip)"
}

cmd_terminate() {
    aws_q "" ec2 terminate-instances --instance-ids "$(instance_id)" --query 'TerminatingInstances[0].CurrentState.Name' --output text
    [[ $DRY_RUN == 1 ]] || rm -f "$(state_file)"
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
        backup) cmd_backup "$@" ;;
        watch-spot) cmd_watch_spot "$@" ;;
        budget) cmd_budget "$@" ;;
        bench) cmd_bench "$@" ;;
        status) cmd_status "$@" ;;
        stop) cmd_stop "$@" ;;
        launch) cmd_launch "$@" ;;
        resume) cmd_resume "$@" ;;
        ssh) ssh_cmd "$@" ;;
        logs) cmd_logs "$@" ;;
        status-remote) ssh_cmd "cd ~/resnet && OUT=~/resnet/runs/$RUN HOURLY_USD=$HOURLY_USD ./run_ec2.sh status" ;;
        terminate) cmd_terminate "$@" ;;
        tunnel) cmd_tunnel "$@" ;;
        -h|--help|help) usage ;;
        "") usage; return 2 ;;
        *) say "unknown subcommand '$sub'"; usage; return 2 ;;
    esac
}

main "$@"
