"""
The ResNet family, built bottom-up: block, stage, network, then one constructor per name.

    resnet18 / 34 / 50 / 101 / 152   He et al. 2015, "Deep Residual Learning", as torchvision builds them
                                      (ResNet v1.5: the stride sits on the 3x3 of the bottleneck).
    resnet50d                        He et al. 2019, "Bag of Tricks", ResNet-D: a deep stem of three 3x3
                                      convolutions and an average-pool shortcut when downsampling.

Any of them with blurpool=True: a fixed blur before every strided convolution of the blocks (Zhang 2019,
"Making Convolutional Networks Shift-Invariant Again", applied as FFCV's and Composer's ImageNet recipes do).

The state_dict keys and shapes of resnet18..152 equal torchvision's, so its weights load here and ours load there;
with BlurPool the state_dict also holds each blur's fixed filter, so that torchvision's ResNet, which has no blur and
would compute something else with the same weights, refuses them instead of loading them silently. `python model.py
--export` writes a checkpoint as a torch.export program that needs nothing but torch.
This file also owns the input normalization (done on the device, on uint8 batches) and the one function that
every other script uses to load a checkpoint.
"""
import json
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# ImageNet channel statistics, scaled to uint8 pixels: the loaders hand out uint8, the device normalizes.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(x, dtype=torch.float32):
    """(B, 3, H, W) uint8 on any device -> normalized float of `dtype`, memory format kept."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x.to(dtype) - mean) / std


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class Blur(nn.Module):
    """BlurPool's low-pass filter: the 3x3 binomial blur [1 2 1]^T [1 2 1] / 16 of every channel, with zero padding,
    put before a strided convolution so that it samples a smoothed map instead of aliasing one. No parameters; the
    filter is a buffer in the state_dict (`...blur.kernel`): a network without the blur must not take these weights
    quietly (torchvision's strict load_state_dict names the extra keys)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3))

    def forward(self, x):
        c = x.shape[1]
        return F.conv2d(x, self.kernel.to(x.dtype).expand(c, 1, 3, 3), padding=1, groups=c)


# -----------------------------------------------------------------------------
# blocks

class BasicBlock(nn.Module):
    """Two 3x3 convolutions (resnet18/34)."""
    expansion = 1

    def __init__(self, cin, width, stride=1, downsample=None, blur=False):
        super().__init__()
        self.blur = Blur() if blur and stride > 1 else nn.Identity()  # before the strided conv1 and shortcut
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        x_in = self.blur(x)
        identity = x if self.downsample is None else self.downsample(x_in)
        out = self.relu(self.bn1(self.conv1(x_in)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's v1.5), 1x1 expand by 4."""
    expansion = 4

    def __init__(self, cin, width, stride=1, downsample=None, blur=False):
        super().__init__()
        self.blur = Blur() if blur and stride > 1 else nn.Identity()  # before the strided conv2 and shortcut
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(self.blur(x))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(self.blur(out))))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# -----------------------------------------------------------------------------
# stage and network

def make_stage(block, cin, width, depth, stride, avg_down, blurpool=False):
    """`depth` blocks; the first one changes resolution and/or width and gets a projection shortcut."""
    cout = width * block.expansion
    downsample = None
    if stride != 1 or cin != cout:
        if avg_down:
            # ResNet-D: average-pool then a stride-1 1x1, so the shortcut sees every pixel, not one in four.
            # The Identity keeps the keys the same in every stage (and equal to timm's resnet50d).
            pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            pool = pool if stride != 1 else nn.Identity()
            downsample = nn.Sequential(pool, conv1x1(cin, cout), nn.BatchNorm2d(cout))
        else:
            downsample = nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    blocks = [block(cin, width, stride, downsample, blur=blurpool)]
    blocks += [block(cout, width) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class ResNet(nn.Module):

    def __init__(self, block, depths, num_classes=1000, deep_stem=False, avg_down=False, zero_init_residual=True,
                 blurpool=False):
        super().__init__()
        if deep_stem:
            # ResNet-C/D stem: three 3x3 convs (32, 32, 64) cost about the same as one 7x7 and see the same field
            self.conv1 = nn.Sequential(
                conv3x3(3, 32, stride=2), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                conv3x3(32, 32), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                conv3x3(32, 64))
        else:
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths, cin = (64, 128, 256, 512), 64
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stage = make_stage(block, cin, width, depth, stride=1 if i == 0 else 2, avg_down=avg_down,
                               blurpool=blurpool)
            setattr(self, f"layer{i + 1}", stage)  # torchvision's names: layer1..layer4
            cin = width * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.init_weights(zero_init_residual)

    def init_weights(self, zero_init_residual):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # nn.Linear keeps PyTorch's default init, as torchvision's does.
        if zero_init_residual:
            # Goyal et al. 2017, "Accurate, Large Minibatch SGD": a zero gamma on the last BN of each residual
            # branch makes every block start as the identity, which makes large-batch warm-up stable.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x):                                   # (B, 3, 224, 224)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, 56, 56)
        x = self.layer1(x)                                  # (B, 256, 56, 56) for bottlenecks, 64 for basic
        x = self.layer2(x)                                  # (B, 512, 28, 28)
        x = self.layer3(x)                                  # (B, 1024, 14, 14)
        x = self.layer4(x)                                  # (B, 2048, 7, 7)
        x = torch.flatten(self.avgpool(x), 1)               # (B, 2048)
        return self.fc(x)                                   # (B, num_classes)


# -----------------------------------------------------------------------------
# constructors

ARCHS = {
    "resnet18": dict(block=BasicBlock, depths=(2, 2, 2, 2)),
    "resnet34": dict(block=BasicBlock, depths=(3, 4, 6, 3)),
    "resnet50": dict(block=Bottleneck, depths=(3, 4, 6, 3)),
    "resnet101": dict(block=Bottleneck, depths=(3, 4, 23, 3)),
    "resnet152": dict(block=Bottleneck, depths=(3, 8, 36, 3)),
    "resnet50d": dict(block=Bottleneck, depths=(3, 4, 6, 3), deep_stem=True, avg_down=True),
}


def build_model(arch, num_classes=1000, zero_init_residual=True, blurpool=False):
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}; choose one of {', '.join(ARCHS)}")
    return ResNet(num_classes=num_classes, zero_init_residual=zero_init_residual, blurpool=blurpool, **ARCHS[arch])


def resnet18(**kw): return build_model("resnet18", **kw)
def resnet34(**kw): return build_model("resnet34", **kw)
def resnet50(**kw): return build_model("resnet50", **kw)
def resnet101(**kw): return build_model("resnet101", **kw)
def resnet152(**kw): return build_model("resnet152", **kw)
def resnet50d(**kw): return build_model("resnet50d", **kw)


# -----------------------------------------------------------------------------
# checkpoints: the contract between train.py and every script after it
#
# A checkpoint is one dict, saved with torch.save and read back with weights_only=True (tensors, numbers, strings and
# plain containers only, so a file cannot run code). FIELDS below is its format, the one definition of it: every key,
# its group, its default, what it holds. Group "file": in every file, weights-only ones too (a key a file lacks reads
# as its default); group "run": only in a file that can be resumed (train.py's last.pt, best.pt, the newest
# epoch_NNN.pt). From the table follow the writers (save_checkpoint takes exactly one group's keys or all of them:
# a field missing from a writer, or one the table lacks, stops the save), the slimming of weights-only files
# (save_weights keeps the "file" group) and the readers (read_checkpoint fills the defaults and upgrades older files
# step by step, UPGRADES). A new field: its line here and its value in its writer (train.snapshot for the run's files;
# save_weights copies the "file" group); a changed field: bump FORMAT and add its step to UPGRADES.

FIELDS = dict(
    format=("file", None, "int: FORMAT, the version of this layout; a file without it is version 1 (before "
                          "2026-12-03)"),
    model=("file", None, "dict: the bare network's state_dict: torchvision's keys, no 'module.' or '_orig_mod.' "
                         "prefix, and with BlurPool each blur's filter ('layerN.0.blur.kernel'), which torchvision "
                         "lacks"),
    weights=("file", "model", "str: which weights `model` holds: model, or ema (app.py --export-space --ema)"),
    ema=("file", None, "dict | None: AveragedModel's state_dict with --ema ('module.'-prefixed, 'n_averaged')"),
    args=("file", {}, "dict: vars(args) of the train.py run: arch, blurpool, eval_size and tta rebuild the network "
                      "and its evaluation; RESUME_MUST_MATCH in train.py checks the rest on a resume"),
    argv=("file", None, "list[str]: train.py's command line (a preset it chose for the user, as if given)"),
    classes=("file", None, "list[str]: the class folders (wnids), in label order"),
    class_names=("file", None, "list[str]: readable names, in label order"),
    metrics=("file", None, "dict | None: log.jsonl's row of the last finished epoch (None in a mid-epoch save)"),
    optimizer=("run", None, "dict: the optimizer's state_dict"),
    scheduler=("run", None, "dict: OneCycleLR's state_dict"),
    scaler=("run", None, "dict | None: the loss scaler's state_dict (None unless fp16)"),
    rng=("run", None, "dict: {'torch': ByteTensor, 'python': tuple}, the generators of rank 0"),
    world=("run", None, "int: the processes of the session that wrote it (a resume may have others)"),
    global_batch=("run", None, "int: images per optimizer step, the run's constant on any number of processes"),
    amp=("run", None, "str | None: the precision it trained in: bf16, fp16 or fp32 (None: unknown, a version 2 file "
                      "without a loss scaler's state)"),
    progress=("run", None, "dict: epochs_done (whole epochs finished, so the next epoch, 0-based); step (optimizer "
                           "steps done in that next epoch, 0 at an epoch's end); best_top1; sums (the epoch's running "
                           "sums so far over all processes, in train.SUMS' order; a file with fewer reads the missing "
                           "ones as 0); lr_steps (the [epoch, LR] of each logged step of that epoch)"),
)
FORMAT = 5
RESUME_KEYS = tuple(k for k, (group, _, _) in FIELDS.items() if group == "run")
OPTIONAL = {k: default for k, (group, default, _) in FIELDS.items() if group == "file" and k not in ("format", "model")}
KEYS = set(FIELDS)
TTA = ("none", "flip")  # the evaluations a run may use: its checkpoint's args['tta'] (evaluate.log_probabilities)


def upgrade_1_to_2(ckpt):
    """Version 1 spread the run's progress over the top level ('epoch' was the next epoch, while metrics['epoch']
    was the one just done), and app.py's model.pt said 'ema_weights' where the others said nothing."""
    if "epoch" in ckpt:  # a whole or slimmed train.py checkpoint (a v1 model.pt has no progress)
        sums = [float(ckpt.pop("loss_sum", 0.0)), float(ckpt.pop("hits", 0)), float(ckpt.pop("counted", 0)),
                float(ckpt.pop("mixed_batches", 0))]
        progress = dict(epochs_done=ckpt.pop("epoch"), step=ckpt.pop("step", 0), best_top1=ckpt.pop("best_top1", 0.0),
                        sums=sums, lr_steps=ckpt.pop("lr_steps", []))
        if "optimizer" in ckpt:  # a slimmed file keeps no state of the run
            ckpt["progress"] = progress
    ckpt["weights"] = "ema" if ckpt.pop("ema_weights", False) else "model"
    return ckpt


def upgrade_2_to_3(ckpt):
    """Version 3 (the run continued on any number of GPUs) records the global batch and the precision, and sums the
    epoch's running sums over all processes, with the micro-batches counted. Version 2 held rank 0's sums alone: the
    other ranks' are estimated as equal to them, which only a mid-epoch file of a multi-GPU run needs."""
    if "progress" in ckpt:
        args, world = ckpt["args"], ckpt["world"]
        ckpt["global_batch"] = args["batch_size"] * world * args["accum_steps"]
        ckpt["amp"] = "fp16" if ckpt.get("scaler") else None  # only fp16 keeps a scaler's state
        loss, hits, counted, mixed = ckpt["progress"]["sums"]
        micro = ckpt["progress"]["step"] * args["accum_steps"]
        ckpt["progress"]["sums"] = [world * v for v in (loss, micro, hits, counted, mixed)]
    return ckpt


def upgrade_3_to_4(ckpt):
    """Version 4 keeps BlurPool's filters in the state_dict (Blur), in the weights and in the EMA's."""
    if ckpt["args"].get("blurpool"):
        with torch.device("meta"):  # the keys only
            keys = [k for k in build_model(ckpt["args"]["arch"], blurpool=True).state_dict()
                    if k.endswith("blur.kernel")]
        ckpt["model"] = {**ckpt["model"], **{k: Blur().kernel for k in keys}}
        if ckpt.get("ema"):  # AveragedModel's copy of the network, its buffers included
            ckpt["ema"] = {**ckpt["ema"], **{f"module.{k}": Blur().kernel for k in keys}}
    return ckpt


def upgrade_4_to_5(ckpt):
    """Version 5 spells TTA as every script does, "none" or "flip", where train.py's args held a bool."""
    if isinstance((ckpt.get("args") or {}).get("tta"), bool):
        ckpt["args"] = {**ckpt["args"], "tta": "flip" if ckpt["args"]["tta"] else "none"}
    return ckpt


UPGRADES = [upgrade_1_to_2, upgrade_2_to_3, upgrade_3_to_4, upgrade_4_to_5]  # UPGRADES[v - 1] turns v into v + 1
assert len(UPGRADES) == FORMAT - 1, "one upgrade step per version"


def clean_state_dict(sd):
    """Drop the prefixes that DDP ('module.') and torch.compile ('_orig_mod.') put on keys."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        out[k] = v
    return out


def read_checkpoint(path, map_location="cpu"):
    """The one reader: a checkpoint of this project, of any version, as a dict of today's FORMAT; or a bare
    torchvision state_dict, as such a dict with only `model` (and `weights`). torch.load runs with weights_only=True:
    only tensors and plain containers are unpickled, so a checkpoint cannot run code. Failures are one-line errors
    that name the file."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with train.py or pass another path")
    except Exception:  # the unpickler refuses anything but tensors and containers; other files land here too
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80" and head != b"PK":  # neither torch.save's zip nor a legacy pickle: torch's own advice
            # (load it with weights_only=False) would be wrong here, and unsafe
            raise ValueError(f"{path} is not a PyTorch checkpoint: pass a train.py checkpoint (.pt) or a state_dict "
                             f"saved with torch.save") from None
        raise ValueError(f"checkpoint {path} cannot be loaded safely (weights_only=True): it is cut short, or holds "
                         f"objects that would run code when unpickled, which no file of this project does; it is not "
                         f"read") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state_dict or checkpoint dict")
    if not isinstance(ckpt.get("model"), dict):  # a bare state_dict (torchvision's, or anyone's): tensors by name
        return {**OPTIONAL, "format": FORMAT, "model": clean_state_dict(ckpt)}
    version = ckpt.get("format", 1)
    if version > FORMAT:
        raise ValueError(f"checkpoint {path} has format {version}, newer than this code reads ({FORMAT}); update the "
                         f"code (git pull)")
    for step in UPGRADES[version - 1:]:
        ckpt = step(ckpt)
    return {**OPTIONAL, **ckpt, "format": FORMAT, "model": clean_state_dict(ckpt["model"])}


def save_atomic(obj, path):
    """Write to a temp file, fsync, then os.replace: `path` is always a whole checkpoint, old or new."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk surfaces as either, depending on where torch.save was
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous one is intact" if os.path.exists(path) else "there was none before"
        raise OSError(f"could not write {path} ({str(e).splitlines()[0]}); {kept}. Free disk space and run the same "
                      f"command again to resume") from None
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except PermissionError:  # Windows opens no folder as a file: there the rename stands without its fsync
        return
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def save_checkpoint(ckpt, path):
    """The writer of every checkpoint: exactly FIELDS' "file" group (a weights-only file) or all of FIELDS (a file
    that can be resumed), stamped with FORMAT, written atomically. A field the table lacks, or one of its group the
    writer left out, stops the save: nothing vanishes silently."""
    keys, file_keys = set(ckpt) | {"format"}, {k for k, (group, _, _) in FIELDS.items() if group == "file"}
    assert keys in (file_keys, KEYS), (f"a checkpoint holds the format's 'file' fields or all of FIELDS: unknown "
                                       f"{sorted(keys - KEYS)}, missing {sorted(file_keys - keys)} of the file's, "
                                       f"{sorted(KEYS - keys - file_keys)} of the run's (model.FIELDS)")
    save_atomic({**ckpt, "format": FORMAT}, path)


def save_weights(ckpt, path, only=None):
    """A weights-only file of a checkpoint: everything but the state of the run (RESUME_KEYS), about half the size
    of a whole one, since SGD's momentum is as large as the weights. only=None keeps the weights and the EMA's (a
    slimmed epoch_NNN.pt, which evaluate.py --ema still reads); "model" keeps the weights alone; "ema" keeps the EMA's
    alone, as `model` (an app.py Space that serves them)."""
    slim = {k: v for k, v in ckpt.items() if k not in RESUME_KEYS}
    if only == "ema":
        slim["model"], slim["weights"] = ema_state_dict(ckpt, path), "ema"
    if only is not None:
        slim["ema"] = None
    save_checkpoint(slim, path)


def ema_state_dict(ckpt, path):
    """The EMA's weights as a state_dict of the network, from AveragedModel's ('module.'-prefixed, 'n_averaged')."""
    if ckpt["weights"] == "ema":
        return ckpt["model"]
    if not ckpt.get("ema"):
        raise ValueError(f"--ema, but {path} holds no EMA weights; train with --ema 0.9999 or drop --ema")
    return {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}


def load_weights(model, path, classes):
    """Only the weights of a checkpoint (or a torchvision state_dict) into `model` (train.py --init-from). A head
    trained on other classes than `classes` stays at its fresh initialization. Returns a line to print."""
    ckpt = read_checkpoint(path)
    theirs, note = ckpt["classes"], ""
    blurs = {k for k in model.state_dict() if k.endswith("blur.kernel")}  # fixed filters, not learned: any fit
    sd = {k: v for k, v in ckpt["model"].items() if k in blurs or not k.endswith("blur.kernel")}
    if len(sd) < len(ckpt["model"]):
        note = "; its network had BlurPool, this one has not (--no-blurpool): it starts from a different function"
    fc = sd.get("fc.weight")
    if fc is None or fc.shape != model.fc.weight.shape or (theirs is not None and theirs != classes):
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
        note += (f"; its head predicts {0 if fc is None else fc.shape[0]} other classes than the {len(classes)} of "
                 f"the data, so the fc layer starts afresh")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"--init-from {path} does not fit the network: {str(e).splitlines()[1].strip()}") from None
    if unexpected or set(missing) - {"fc.weight", "fc.bias"} - blurs:
        raise ValueError(f"--init-from {path} does not fit the network: missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}; pass the --arch it was trained with")
    return f"initialized from the weights of {path}{note}; optimizer, schedule and epochs start afresh"


def newest_checkpoint(pattern="runs/*/best.pt"):
    """The most recently written best.pt of the runs in this folder (evaluate.py, gradcam.py and app.py given no
    --checkpoint), or None."""
    import glob
    found = glob.glob(pattern)
    return max(found, key=os.path.getmtime) if found else None


def load_checkpoint(path, arch=None, ema=False, map_location="cpu"):
    """A network to run, from any checkpoint or a bare torchvision state_dict (then pass `arch`; the class count is
    read off the fc weight). Returns (model in eval mode, info), info holding what every consumer needs, worked out
    here once: arch, names (readable class names), classes (folders, or None), eval_size and tta (how the run
    evaluated), ema (whether the model holds the EMA weights), and the run's args, argv and metrics."""
    ckpt = read_checkpoint(path, map_location)
    saved = ckpt["args"]
    arch = saved.get("arch", arch)
    if arch is None:
        raise ValueError(f"checkpoint {path} is a bare state_dict; say which network it is with --arch")
    sd = ema_state_dict(ckpt, path) if ema else ckpt["model"]
    if "fc.weight" not in sd:
        raise ValueError(f"checkpoint {path} has no fc.weight; it is not a ResNet classifier state_dict")
    model = build_model(arch, num_classes=sd["fc.weight"].shape[0], blurpool=bool(saved.get("blurpool")))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit --arch {arch}: {str(e).splitlines()[1].strip()}") from None
    n = model.fc.out_features
    names = ckpt["class_names"] or ckpt["classes"]
    if not names and n == 1000:  # a torchvision ImageNet state_dict: its categories are in sorted-wnid order
        from torchvision.models import ResNet50_Weights
        names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    info = dict(arch=arch, names=list(names or map(str, range(n))), classes=ckpt["classes"],
                eval_size=saved.get("eval_size") or saved.get("img_size") or 224, tta=saved.get("tta") or "none",
                ema=ema or ckpt["weights"] == "ema", args=saved, argv=ckpt["argv"], metrics=ckpt["metrics"])
    return model.eval(), info


# -----------------------------------------------------------------------------
# a summary: parameters and multiply-adds per stage

def summary(arch, img_size, num_classes=1000, blurpool=False):
    """Rows (stage, output shape, parameters, mult-adds) for one image, and a total row. Counted on the meta
    device (no memory, no compute) with torch.utils.flop_counter, which counts 2 FLOPs per multiply-add of the
    convolutions and the fc layer, the convention of torchvision's "GFLOPS" (4.09 G for ResNet-50 at 224 px)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        m = build_model(arch, num_classes=num_classes, blurpool=blurpool).eval()
        x = torch.empty(1, 3, img_size, img_size)
    stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
    head = nn.Sequential(m.avgpool, nn.Flatten(1), m.fc)
    rows = []
    for name, stage in (("stem", stem), ("layer1", m.layer1), ("layer2", m.layer2), ("layer3", m.layer3),
                        ("layer4", m.layer4), ("head", head)):
        with FlopCounterMode(display=False) as counter:
            x = stage(x)
        params = sum(p.numel() for p in stage.parameters())
        rows.append((name, tuple(x.shape[1:]), params, counter.get_total_flops() // 2))
    rows.append(("total", tuple(x.shape[1:]), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    return rows


def format_summary(rows, arch, img_size):
    lines = [f"{arch} at {img_size} px, per image", f"{'stage':<8} {'output':>16} {'parameters':>14} {'mult-adds':>16}"]
    for name, shape, params, macs in rows:
        lines.append(f"{name:<8} {str(shape):>16} {params:>14,} {macs:>16,}")
    return "\n".join(lines)


def write_summary(path, arch, img_size, num_classes, blurpool=False):
    """The per-stage table to `path` (train.py's OUT/model_summary.txt); returns a line with the totals."""
    rows = summary(arch, img_size, num_classes, blurpool)
    with open(path, "w") as f:
        f.write(format_summary(rows, arch, img_size) + "\n")
    return f"{arch}: {rows[-1][2]:,} parameters, {rows[-1][3] / 1e9:.3g} G mult-adds per image at {img_size} px"


# -----------------------------------------------------------------------------
# an export that runs with torch alone

class Deployed(nn.Module):
    """A trained network as one function of uint8 images: (B, 3, S, S) uint8 RGB, resized and center-cropped as
    evaluate.py does (shorter side to S / 0.875, then the middle S x S), to (B, classes) probabilities. The
    normalization is inside; flip TTA is not (average the outputs of x and x.flip(3) for it)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):                                   # (B, 3, S, S) uint8
        return self.model((x.float() - self.mean) / self.std).softmax(1)  # (B, classes)


def export(checkpoint, out, ema=False):
    """model.pt2 (torch.export's program of Deployed, any batch size), classes.txt (the class names, one a line, in
    output order) and model.json (the input, the eval size, the classes) in folder `out`. Returns the files."""
    model, info = load_checkpoint(checkpoint, ema=ema)
    size = info["eval_size"]
    deployed = Deployed(model).eval()
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(deployed, (example,), dynamic_shapes={"x": {0: batch}})
    os.makedirs(out, exist_ok=True)
    torch.export.save(program, os.path.join(out, "model.pt2"))
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.write("\n".join(info["names"]) + "\n")
    with open(os.path.join(out, "model.json"), "w") as f:
        json.dump(dict(input=f"uint8 (B, 3, {size}, {size}), RGB, 0-255: the image's shorter side resized to "
                             f"{round(size / 0.875)} px, then the center {size} x {size} (torchvision's Resize and "
                             f"CenterCrop)", output="probabilities (B, classes), in the order of classes.txt",
                       eval_size=size, resize_size=round(size / 0.875), arch=info["arch"], ema=info["ema"],
                       tta=info["tta"], classes=info["classes"], names=info["names"],
                       load="torch.export.load('model.pt2').module()(x)"), f, indent=1)
    return ["model.pt2", "classes.txt", "model.json"]


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Print a ResNet's parameters and multiply-adds per stage; or export a "
                                            "checkpoint as a torch.export program (--export).")
    p.add_argument("--arch", default="resnet50", choices=list(ARCHS))
    p.add_argument("--img-size", type=int, default=224, help="input side, px")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--blurpool", action="store_true", help="with BlurPool (its blur convs add mult-adds)")
    p.add_argument("--export", metavar="CHECKPOINT", help="write CHECKPOINT as model.pt2 (torch alone runs it: uint8 "
                                                          "images in, probabilities out), classes.txt and model.json")
    p.add_argument("--out", default="export", help="with --export: the folder")
    p.add_argument("--ema", action="store_true", help="with --export: the EMA weights")
    args = p.parse_args(argv)
    if min(args.img_size, args.num_classes) < 1:
        p.error(f"--img-size and --num-classes must be at least 1, got {args.img_size} and {args.num_classes}")
    if args.export:
        try:
            files = export(args.export, args.out, args.ema)
        except (ValueError, FileNotFoundError) as e:
            print(f"model.py: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        print(f"wrote {', '.join(os.path.join(args.out, f) for f in files)}: "
              f"torch.export.load('{os.path.join(args.out, 'model.pt2')}').module()(uint8 images) gives probabilities")
        return
    print(format_summary(summary(args.arch, args.img_size, args.num_classes, args.blurpool), args.arch,
                         args.img_size))


if __name__ == "__main__":
    main()
