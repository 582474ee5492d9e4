"""The README's EC2 section, followed as a new user follows it: every bash block of "From zero to a trained ResNet-50
on EC2", in its order, line by line, from a clone of this repository, against moto's local AWS and the stand-ins for
what moto does not do (Service Quotas, the Kaggle CLI, SSH to the instance) and for the instances themselves: after
each `launch`, its user-data runs here (setup, prepare or data, train, finish, the end step) on a few real JPEGs, with
train.py on the CPU. A README edit that breaks the journey breaks this test. Nothing leaves 127.0.0.1, and SHUTDOWN is
conftest's stand-in."""
import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
import zipfile


from conftest import BIN, IMAGENETTE, ROOT, boto, fake_venv, needs_imagenette

pytestmark = needs_imagenette
WNIDS = ("n01440764", "n02102040", "n02979186")  # 3 Imagenette classes: tench, English springer, cassette player

# What the README's blocks do that a test cannot or need not: installing packages (pip is a recorder here), storing
# the keys (the environment carries moto's), and a block that shows another way in ("# or, ...": not followed).
SKIPPED_BLOCK = "# or,"

LAPTOP_BIN = {
    # the aws CLI against moto, but for Service Quotas, which moto does not serve: the quota each code has here
    "aws": f"""#!/bin/sh
case "$1 $2" in
    "configure "*) exit 0 ;;
    "service-quotas get-service-quota") case "$*" in *L-3819A6DF*) echo 8.0 ;; *L-1216C47A*) echo 64.0 ;;
                                           *) echo 0.0 ;; esac; exit 0 ;;
esac
exec {BIN}/aws "$@"
""",
    "pip": '#!/bin/sh\necho "pip $*" >> "$JOURNEY/pip.log"\n',
    # Kaggle's CLI: `competitions files` checks the token; `download` writes the competition's zip (a few real JPEGs
    # in its layout); its token must be the user's
    "kaggle": """#!/bin/sh
conf=${KAGGLE_CONFIG_DIR:-$HOME/.kaggle}
grep -q '"key": "journey-key"' "$conf/kaggle.json" 2>/dev/null || { echo "401 - Unauthorized" >&2; exit 1; }
case "$1 $2" in
    "competitions files") echo "name size"; echo "imagenet-object-localization-challenge.zip 155GB" ;;
    "competitions download") cp "$JOURNEY/competition.zip" "$5/$3.zip" ;;
esac
""",
    # SSH to the instance: its commands run here, in its home, with its files where the instance has them
    "ssh": """#!/bin/sh
while [ $# -gt 1 ]; do case "$1" in -i|-o|-L) shift 2 ;; -N) exit 0 ;; *@*) shift; break ;; *) shift ;; esac; done
command=$(echo "$*" | sed "s|/etc/resnet-run.env|$BOOT_ROOT/etc/resnet-run.env|g")
cd "$INSTANCE_HOME" && HOME=$INSTANCE_HOME exec bash -c "$command"
""",
    "scp": """#!/bin/sh
while [ $# -gt 2 ]; do shift; done
cp "$INSTANCE_HOME/${1#*:}" "$2"
""",
    "ss": '#!/bin/sh\necho "LISTEN 0 128 127.0.0.1:7860 0.0.0.0:*"; echo "LISTEN 0 128 127.0.0.1:6006 0.0.0.0:*"\n',
}


def readme_blocks():
    """The bash blocks of the README's EC2 walk-through, in order: (heading of their step, [command lines])."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From zero to a trained ResNet-50 on EC2"):text.index("### What will it cost?")]
    blocks, step = [], None
    for part in re.split(r"(\*\*\d+\. [^*]+\*\*|```bash\n.*?```)", section, flags=re.S):
        if part.startswith("**"):
            step = part.strip("*")
        elif part.startswith("```bash"):
            lines = [line.split("  #")[0].rstrip() for line in part[len("```bash\n"):-3].splitlines()]
            blocks.append((step, [line for line in lines if line and not line.startswith("#")],
                           part[len("```bash\n"):].startswith(SKIPPED_BLOCK)))
    return blocks


def competition_zip(path):
    """The Kaggle download's layout: 3 classes of real Imagenette JPEGs (8 train each, 6 val in all), the label
    files."""
    with zipfile.ZipFile(path, "w") as z:
        rows = ["ImageId,PredictionString"]
        for c, wnid in enumerate(WNIDS):
            files = sorted((IMAGENETTE / "train" / wnid).iterdir())[:8]
            for f in files:
                z.write(f, f"ILSVRC/Data/CLS-LOC/train/{wnid}/{f.name}")
            for k, f in enumerate(sorted((IMAGENETTE / "val" / wnid).iterdir())[:2]):
                name = f"ILSVRC2012_val_{2 * c + k:08d}"
                z.write(f, f"ILSVRC/Data/CLS-LOC/val/{name}.JPEG")
                rows.append(f"{name},{wnid} 1 2 3 4")
        z.writestr("LOC_val_solution.csv", "\n".join(rows) + "\n")
        z.writestr("LOC_synset_mapping.txt", "".join(f"{w} name of {w}\n" for w in WNIDS))
    return path


class Journey:
    """The laptop (a clone of this repository, a home, a shell whose exports persist from line to line) and the
    instances its launches start (each run here from its user-data)."""

    def __init__(self, tmp, moto):
        self.tmp, self.moto = tmp, moto
        self.repo = tmp / "laptop" / "resnet"
        self.repo.mkdir(parents=True)
        tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True).stdout.split()
        for name in tracked:  # the committed files, as `git clone` gives them (docs images and tests aside: size)
            if not name.startswith(("docs/", "tests/")) and (ROOT / name).is_file():
                (self.repo / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, self.repo / name)
        git = ["git", "-C", str(self.repo), "-c", "user.name=you", "-c", "user.email=you@example.com"]
        for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "a clone"]):
            subprocess.run(git + args, check=True, capture_output=True)
        self.home, self.bin = tmp / "laptop" / "home", tmp / "laptop" / "bin"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".kaggle").mkdir()
        (self.home / ".kaggle" / "kaggle.json").write_text('{"username": "you", "key": "journey-key"}')
        self.bin.mkdir()
        for name, text in LAPTOP_BIN.items():
            (self.bin / name).write_text(text)
            (self.bin / name).chmod(0o755)
        (self.bin / "python").symlink_to(sys.executable)
        competition_zip(tmp / "competition.zip")
        self.exported = {}
        self.env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "TMUX", "DATA_DIR")}
        self.env.update(moto, HOME=str(self.home), PATH=f"{self.bin}:{BIN}:{os.environ['PATH']}", JOURNEY=str(tmp),
                        MY_IP="198.51.100.7", LAUNCH_RETRY_S="0")
        self.instances = []

    def line(self, command, check=True):
        """One line of a README block, in the laptop's shell: what a line exports stays for the lines after it."""
        env = {**self.env, **self.exported}
        after = self.tmp / "after.env"
        p = subprocess.run(["bash", "-c", f"set -e\n{command}\nenv -0 > {after}"], cwd=self.repo,
                           capture_output=True, text=True, env=env, timeout=300)
        if p.returncode == 0:
            now = dict(item.split("=", 1) for item in after.read_bytes().decode().split("\0") if "=" in item)
            self.exported.update({k: v for k, v in now.items() if env.get(k) != v and k not in ("_", "SHLVL", "PWD")})
        assert not check or p.returncode == 0, f"{command}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return p

    def boot(self, instance_id, **extra):
        """The instance `launch` started: its user-data (as EC2 hands it over) run here as at its first boot, then its
        service, as systemd runs it, on this machine's CPU. Returns (the service's process, shutdown's calls)."""
        n = len(self.instances)
        self.instances.append(instance_id)
        ec2 = boto(self.moto, "ec2")
        user_data = base64.b64decode(ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")[
            "UserData"]["Value"]).decode()
        home, boot, fake = self.tmp / f"instance{n}" / "home", self.tmp / f"instance{n}" / "boot", \
            self.tmp / f"instance{n}" / "bin"
        fake.mkdir(parents=True)
        user_data = user_data.replace("/home/ubuntu", str(home)).replace("RUN_USER=ubuntu", "RUN_USER=root")
        for name, text in (("systemctl", "#!/bin/sh\nexit 0\n"), ("lsblk", "#!/bin/sh\nexit 0\n"),
                           ("nvidia-smi", '#!/bin/sh\necho "GPU 0: NVIDIA A10G (UUID: GPU-0)"\n'),
                           ("kaggle", LAPTOP_BIN["kaggle"])):
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
        venv = fake_venv(fake.parent / "venv")  # its python is this one; its pip records (the instance's installs)
        subprocess.run(["bash", "-c", user_data], check=True, env={**self.env, "BOOT_ROOT": str(boot),
                                                                   "SYSTEMCTL": str(fake / "systemctl")})
        settings = {**self.moto, "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "VENV": str(venv), "SUDO": "",
                    "LSBLK": str(fake / "lsblk"), "NEEDED": "python3 aws", "MIN_SHM_GB": "0", "HOME": str(home),
                    "IMDS_URL": "http://127.0.0.1:9", "JOURNAL": "echo the journal's last line",
                    "DATA_DIR": str(self.tmp / f"instance{n}" / "imagenet"), "KAGGLE": str(fake / "kaggle"),
                    "JOURNEY": str(self.tmp), "RESTART_DELAY_S": "0", **extra}
        with open(boot / "etc/resnet-run.env", "a") as f:
            f.writelines(f"{k}={shlex.quote(v)}\n" for k, v in settings.items())
        shutdowns = self.tmp / f"instance{n}" / "shutdown.log"
        p = subprocess.run([str(boot / "usr/local/bin/resnet-run")], capture_output=True, text=True, timeout=600,
                           env={**self.env, "SHUTDOWN_LOG": str(shutdowns), "HOME": str(home)})
        self.env.update(INSTANCE_HOME=str(home), BOOT_ROOT=str(boot))  # where ssh from the laptop lands
        return p, shutdowns.read_text().split() if shutdowns.exists() else [], boot, home


def test_the_readme_ec2_walk_through_from_a_new_account_to_the_demo(tmp_path, moto):
    """check, prepare from Kaggle (its instance run here), launch (its instance run here: setup, data, train, finish,
    the end step), watching it, its results on the laptop, app.py on them, resume and terminate: every line of the
    walk-through as written, and what each promises, checked after it."""
    journey = Journey(tmp_path, moto)
    ec2, iam, s3, ssm = (boto(moto, s) for s in ("ec2", "iam", "s3", "ssm"))
    image = ec2.describe_images()["Images"][0]["ImageId"]
    ssm.put_parameter(Name="/test/dlami", Value=image, Type="String")  # AWS's public AMI parameter (moto reserves
    journey.env["AMI_PARAM"] = "/test/dlami"                           # /aws/ names), where launch reads it
    blocks = readme_blocks()
    assert [step.split(".")[0] for step, _, skipped in blocks if not skipped] == ["1", "2", "3", "6", "7", "8"]
    read = lambda key: json.loads(s3.get_object(Bucket="my-bucket", Key=key)["Body"].read())  # noqa: E731
    ran, sg_before = [], None
    for step, lines, skipped in blocks:
        if skipped:
            continue
        if step.startswith("6."):  # the laptop is elsewhere now, and its user let an office in to the instances too
            journey.env["MY_IP"] = "198.51.100.8"
            group = ec2.describe_security_groups(GroupNames=["resnet-ec2"])["SecurityGroups"][0]["GroupId"]
            office = dict(CidrIp="203.0.113.9/32", Description="office")
            ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
                dict(IpProtocol="tcp", FromPort=22, ToPort=22, IpRanges=[office])])
            sg_before = group
        if step.startswith("7."):  # the run has ended: its instance shut itself down, which terminates it
            ec2.terminate_instances(InstanceIds=[journey.instances[-1]])
        for command in lines:
            ran.append(command)
            if command.startswith("python app.py"):  # the demo serves until Ctrl-C: run as a server, then stopped
                serve_the_demo(journey, command)
                continue
            p = journey.line(command)
            if "./run_ec2.sh check" in command:
                assert "check: nothing in the way of" in p.stderr, p.stderr
            elif "PREPARE=1 FROM_KAGGLE=1" in command:  # prepare's instance, from Kaggle: the shards, no token left
                assert "the Kaggle token is in the SSM SecureString parameter" in p.stderr, p.stderr
                instance = (journey.repo / ".ec2" / "prepare-imagenet-1k.instance").read_text().split()[0]
                proc, shutdowns, _, _ = journey.boot(instance)
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
                ec2.terminate_instances(InstanceIds=[instance])  # shutdown terminates it
                manifest = read("imagenet-1k/shards-shorter320/manifest.json")
                assert manifest["files"] == 3 * 8 + 6 + 2 and manifest["unreadable"] == []
                ended = read("imagenet-1k/shards-shorter320/ended.json")
                assert (ended["status"], ended["stage"]) == ("done", "prepare") and shutdowns[-1] == "now", ended
                assert [q["Name"] for q in ssm.describe_parameters()["Parameters"]] == ["/test/dlami"], "token stayed"
            elif re.search(r"INSTANCE_TYPE=g5\.xlarge SPOT=1 .*launch", command):
                check_the_launch(journey, ec2, iam, p, sg_before)
                instance = (journey.repo / ".ec2" / "imagenet-1k-resnet50.instance").read_text().split()[0]
                proc, shutdowns, boot, home = journey.boot(
                    instance, TRAIN_CMD=f"{sys.executable} {home_of(tmp_path, 1)}/resnet/train.py --data "
                                        f"{tmp_path}/instance1/imagenet",
                    TRAIN_ARGS="--arch resnet18 --img-size 32 --batch-size 4 --epochs 1 --workers 0 --log-every 1")
                assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
                assert (boot / "etc/resnet-run.env").stat().st_mode & 0o777 == 0o600  # its settings: its user's
                ended = read("runs/imagenet-1k-resnet50/ended.json")
                assert (ended["status"], ended["backup"], ended["finish"]["ok"]) == ("done", "ok", True), ended
                assert ended["commit"] == journey.line("git rev-parse HEAD").stdout.strip()
                assert shutdowns[0].startswith("+") and shutdowns[-1] == "now"  # its lifetime, then the end
            elif command.startswith("./run_ec2.sh list") and step.startswith("3."):  # prepare's has ended
                assert "(no instance of this tool in this region)" in p.stdout, p.stdout
            elif command.startswith("./run_ec2.sh list"):
                assert re.search(r"imagenet-1k-resnet50 +g5\.xlarge +spot .* [0-9a-f]{12} ", p.stdout), p.stdout
            elif command.startswith("./run_ec2.sh logs"):
                assert "run_ec2.sh: training done" in p.stdout, p.stdout  # the restart loop's lines reach train.log
            elif command.startswith("./run_ec2.sh status-remote"):  # with the instance's own price, not $0
                assert "code: commit" in p.stdout and re.search(r"at \$[0-9.]*[1-9][0-9.]*/h", p.stdout), p.stdout
            elif command.startswith("./run_ec2.sh curves"):
                assert (journey.repo / "runs/imagenet-1k-resnet50/curves.png").stat().st_size > 10_000
            elif command.startswith("./run_ec2.sh results"):
                check_the_results(journey.repo / "runs" / "imagenet-1k-resnet50", p)
            elif command.startswith("./run_ec2.sh resume"):
                assert "last.pt found: launching a new instance" in p.stderr
                assert "as the run's last launch: INSTANCE_TYPE=g5.xlarge SPOT=1 BUDGET_USD=15" in p.stderr
                other = journey.line("RUN=no-such-run ./run_ec2.sh resume", check=False)
                assert other.returncode == 2 and "nothing to resume" in other.stderr
            elif command.startswith("./run_ec2.sh terminate"):  # the resumed instance; then the run's role goes
                assert "resnet-ec2-imagenet-1k-resnet50" not in [r["RoleName"] for r in iam.list_roles()["Roles"]]
    for sub in ("check", "launch", "list", "logs", "status-remote", "curves", "tunnel", "results", "resume",
                "terminate", "python app.py"):
        assert any(sub in command for command in ran), sub


def home_of(tmp_path, n):
    return tmp_path / f"instance{n}" / "home"


def serve_the_demo(journey, command):
    """`python app.py --checkpoint runs/<RUN>/best.pt` on the laptop: it serves the run's own example photos."""
    from test_app import GRADIO_ENV, serving
    log = journey.tmp / "app.log"
    with serving(shlex.split(command)[1:], journey.repo, log, env={**journey.env, **GRADIO_ENV}) as url:
        page = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=30).read().decode()
    text = log.read_text()
    assert "from `best.pt`" in text and "3 examples from " + str(journey.repo / "runs/imagenet-1k-resnet50/examples") \
        in text, text
    assert "gradio" in page


def check_the_launch(journey, ec2, iam, p, group):
    """What the training launch made: the run's own role, IMDSv2 only, SSH from here alone (the rule for the laptop's
    earlier address replaced, the user's own kept), its gp3 disk, its tags; a second launch of the RUN refused."""
    assert "check: nothing in the way of g5.xlarge (spot)" in p.stderr and "the instance runs commit" in p.stderr
    instance = (journey.repo / ".ec2" / "imagenet-1k-resnet50.instance").read_text().split()[0]
    inst = ec2.describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0]
    assert inst["IamInstanceProfile"]["Arn"].endswith(":instance-profile/resnet-ec2-imagenet-1k-resnet50")
    assert inst["MetadataOptions"]["HttpTokens"] == "required" and inst["InstanceLifecycle"] == "spot"
    tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
    assert tags["made-by"] == "run_ec2.sh" and tags["run"] == "imagenet-1k-resnet50" and len(tags["commit"]) == 12
    policy = iam.get_role_policy(RoleName="resnet-ec2-imagenet-1k-resnet50",
                                 PolicyName="resnet-ec2-imagenet-1k-resnet50-s3")["PolicyDocument"]
    grants = {s["Sid"]: (s["Action"], s["Resource"]) for s in policy["Statement"]}
    assert grants["ReadWriteRun"] == (["s3:GetObject", "s3:PutObject"],
                                      "arn:aws:s3:::my-bucket/runs/imagenet-1k-resnet50/*")
    assert {a for a, _ in grants.values() for a in ([a] if isinstance(a, str) else a)} == \
        {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}  # nothing else: no delete, no other service
    assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group]
    sg = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"][0]
    assert [(r["FromPort"], sorted((c["CidrIp"], c.get("Description")) for c in r["IpRanges"]))
            for r in sg["IpPermissions"]] == [(22, [("198.51.100.8/32", "run_ec2.sh launch"),
                                                    ("203.0.113.9/32", "office")])]
    volume = ec2.describe_volumes(VolumeIds=[inst["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]])["Volumes"][0]
    assert volume["VolumeType"] == "gp3" and volume["Size"] == 100  # the data on the instance store: the venv, runs
    again = journey.line("INSTANCE_TYPE=g5.xlarge ./run_ec2.sh launch", check=False)  # the same RUN
    assert again.returncode == 2 and f"has an instance already ({instance}" in again.stderr


def check_the_results(dest, p):
    """runs/<RUN> on the laptop: what the finish step made on the instance, and the run's records."""
    for name in ("best.pt", "log.jsonl", "curves.png", "ended.json", "eval/predictions.csv", "eval/per_class.csv",
                 "eval/confusion.png", "eval/worst.html", "eval/worst_gradcam.png", "space/app.py", "space/model.pt",
                 "space/README.md", "examples"):
        assert (dest / name).exists(), name
    import torch
    weights = torch.load(dest / "best.pt", weights_only=True)
    assert "optimizer" not in weights and weights["model"]  # weights only, as save_weights writes them
    assert re.search(r"best val top-1 [0-9.]+% \(epoch 1 of 1\)", p.stdout) and "the instance ended: done" in p.stdout
    assert "the worst 32, with Grad-CAM" in p.stdout
