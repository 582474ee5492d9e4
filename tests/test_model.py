"""model.py against torchvision: the same keys and shapes, the same outputs under the same weights."""
import json
import pickle
import sys

import pytest
import torch
import torchvision

import model as M
from conftest import ROOT, SAMPLES, run, run_here

TORCHVISION_ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_state_dict_matches_torchvision(arch):
    ours, ref = M.build_model(arch).state_dict(), getattr(torchvision.models, arch)().state_dict()
    assert list(ours) == list(ref)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


def test_resnet50_parameter_count():
    assert sum(p.numel() for p in M.resnet50().parameters()) == 25_557_032


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_outputs_equal_torchvision_under_shared_weights(arch, train_mode):
    torch.manual_seed(0)
    ref = getattr(torchvision.models, arch)(num_classes=7)
    # random BN statistics and affine parameters, so that eval mode is not an identity map
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = M.build_model(arch, num_classes=7)
    ours.load_state_dict(ref.state_dict())
    ours.train(train_mode), ref.train(train_mode)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)  # the same ops in the same order: bitwise


def test_resnet50d_structure():
    net = M.resnet50d(num_classes=10)
    assert len([m for m in net.conv1 if isinstance(m, torch.nn.Conv2d)]) == 3, "deep stem of three 3x3 convs"
    assert all(m.kernel_size == (3, 3) for m in net.conv1 if isinstance(m, torch.nn.Conv2d))
    block = net.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2), "stride on the 3x3"
    pool, conv = block.downsample[0], block.downsample[1]
    assert isinstance(pool, torch.nn.AvgPool2d) and conv.stride == (1, 1), "avg-pool shortcut"
    assert isinstance(net.layer1[0].downsample[0], torch.nn.Identity), "layer1 does not downsample"
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_resnet50d_equals_timm():
    """timm's resnet50d is the published reference implementation of ResNet-D; its keys are ours."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet50d", pretrained=False, num_classes=1000).eval()
    ours = M.resnet50d().eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 25_576_264
    ours.load_state_dict(ref.state_dict())  # strict: every key and shape equal
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("arch,last_bn", [("resnet18", "bn2"), ("resnet50", "bn3"), ("resnet50d", "bn3")])
def test_zero_init_last_bn_gamma(arch, last_bn):
    net = M.build_model(arch)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    assert all(getattr(b, last_bn).weight.abs().sum() == 0 for b in blocks)
    assert all(b.bn1.weight.abs().sum() > 0 for b in blocks)
    off = M.build_model(arch, zero_init_residual=False)
    assert all(getattr(b, last_bn).weight.abs().sum() > 0 for layer in (off.layer1,) for b in layer)


def test_normalize_matches_torchvision_normalize():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    ref = torchvision.transforms.functional.normalize(x.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(M.normalize(x), ref)


def test_load_checkpoint_bare_torchvision_state_dict(tmp_path):
    ref = torchvision.models.resnet18(num_classes=5).eval()
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    net, meta = M.load_checkpoint(tmp_path / "tv.pth", arch="resnet18")
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(net(x), ref(x))
    assert meta["arch"] == "resnet18"
    with pytest.raises(ValueError, match="--arch"):
        M.load_checkpoint(tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="does not fit --arch resnet50"):
        M.load_checkpoint(tmp_path / "tv.pth", arch="resnet50")


def test_load_checkpoint_our_dict_with_prefixes(tmp_path):
    net = M.resnet18(num_classes=3)
    sd = {"module." + k: v for k, v in net.state_dict().items()}  # as a DDP-wrapped model would save it
    torch.save(dict(model=sd, args=dict(arch="resnet18"), classes=["a", "b", "c"]), tmp_path / "ours.pt")
    loaded, meta = M.load_checkpoint(tmp_path / "ours.pt")
    assert meta["classes"] == ["a", "b", "c"] and not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


class Exploit:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_load_checkpoint_refuses_code_in_pickle(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Exploit()}, f)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        M.load_checkpoint(path, arch="resnet18")
    assert "this ran at load time" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="does not exist"):
        M.load_checkpoint(tmp_path / "missing.pt")


class BlurThenConv(torch.nn.Module):
    """The reference BlurPool, written independently of model.py: a separable [1 2 1]/4 blur (rows, then columns,
    zero padding) before a strided torchvision conv, applied to every strided conv with at least 16 input channels,
    which is how FFCV's ImageNet recipe applies it."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        c = x.shape[1]
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        x = torch.nn.functional.conv2d(x, k.view(1, 1, 3, 1).repeat(c, 1, 1, 1), padding=(1, 0), groups=c)
        x = torch.nn.functional.conv2d(x, k.view(1, 1, 1, 3).repeat(c, 1, 1, 1), padding=(0, 1), groups=c)
        return self.conv(x)


def add_reference_blur(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurThenConv(child))
        else:
            add_reference_blur(child)


BLURS = ["layer2.0.blur.kernel", "layer3.0.blur.kernel", "layer4.0.blur.kernel"]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_blurpool_equals_reference_and_keeps_torchvision_keys(arch):
    """torchvision's keys, and each blur's fixed filter besides (which torchvision's ResNet has no place for)."""
    torch.manual_seed(0)
    ours = M.build_model(arch, num_classes=7, blurpool=True).eval()
    ref = getattr(torchvision.models, arch)(num_classes=7)
    assert sorted(ours.state_dict()) == sorted([*ref.state_dict(), *BLURS])
    ref.load_state_dict({k: v for k, v in ours.state_dict().items() if k not in BLURS})
    add_reference_blur(ref)
    ref.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        out, expected = ours(x), ref(x)
        plain = M.build_model(arch, num_classes=7).eval()
        plain.load_state_dict({k: v for k, v in ours.state_dict().items() if k not in BLURS})
        assert not torch.allclose(plain(x), out, atol=1e-3)  # the blur does change the network
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    blurs = [m for m in ours.modules() if isinstance(m, M.Blur)]
    assert len(blurs) == 3  # one per downsampling stage, shared by its strided conv and its shortcut


def test_load_checkpoint_rebuilds_blurpool(tmp_path):
    net = M.build_model("resnet18", num_classes=5, blurpool=True)
    torch.save(dict(model=net.state_dict(), args=dict(arch="resnet18", blurpool=True)), tmp_path / "c.pt")
    loaded, _ = M.load_checkpoint(tmp_path / "c.pt")
    assert sum(isinstance(m, M.Blur) for m in loaded.modules()) == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net.eval()(x))


def test_summary_matches_torchvisions_own_figures():
    """python model.py's per-stage table: the totals are torchvision's published parameters and GFLOPS (its
    weights' metadata, no download) for ResNet-18 and -50 at 224 px, and the stages add up to them."""
    from torchvision.models import ResNet18_Weights, ResNet50_Weights
    for arch, weights in (("resnet18", ResNet18_Weights.IMAGENET1K_V1), ("resnet50", ResNet50_Weights.IMAGENET1K_V2)):
        rows = M.summary(arch, 224)
        total = rows[-1]
        assert total[2] == weights.meta["num_params"]
        assert total[3] / 1e9 == pytest.approx(weights.meta["_ops"], abs=5e-4)
        assert sum(r[2] for r in rows[:-1]) == total[2] and sum(r[3] for r in rows[:-1]) == total[3]
    p = run([sys.executable, str(ROOT / "model.py"), "--arch", "resnet50", "--img-size", "224"])
    assert "25,557,032" in p.stdout and "4,089,184,256" in p.stdout and "layer4" in p.stdout


def test_a_blurpool_checkpoint_does_not_load_silently_into_torchvision(tmp_path):
    """torchvision's ResNet has no blur: with a BlurPool checkpoint's weights it computes something else, so its
    strict load must fail and name the blur's keys (it loaded silently before the format kept them). Checkpoints
    written before that upgrade gain the filters; --no-blurpool weights still load into torchvision."""
    net = M.build_model("resnet18", num_classes=10, blurpool=True)
    M.save_checkpoint(dict(M.OPTIONAL, model=net.state_dict(), args=dict(arch="resnet18", blurpool=True)),
                      tmp_path / "b.pt")  # a weights-only file: the format's "file" fields
    sd = torch.load(tmp_path / "b.pt", weights_only=True)["model"]  # what a user hands torchvision
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "layer2.0.blur.kernel"'):
        torchvision.models.resnet18(num_classes=10).load_state_dict(sd)
    old = {k: v for k, v in net.state_dict().items() if k not in BLURS}  # format 3 kept no filter
    M.save_atomic(dict(format=3, model=old, args=dict(arch="resnet18", blurpool=True)), tmp_path / "old.pt")
    assert set(BLURS) <= set(M.read_checkpoint(tmp_path / "old.pt")["model"])
    plain = M.build_model("resnet18", num_classes=10)
    M.save_checkpoint(dict(M.OPTIONAL, model=plain.state_dict(), args=dict(arch="resnet18", blurpool=False)),
                      tmp_path / "p.pt")
    exact = torch.load(tmp_path / "p.pt", weights_only=True)["model"]
    torchvision.models.resnet18(num_classes=10).load_state_dict(exact)


def test_the_export_runs_with_torch_alone_and_equals_model_py(tmp_path, capfd):
    """python model.py --export: a torch.export program of uint8 images to probabilities, the normalization inside,
    with classes.txt and model.json beside it; loaded by a process that has nothing of this repository, it gives
    model.py's outputs on real photos, at any batch size."""
    torch.manual_seed(0)
    net = M.build_model("resnet18", num_classes=3, blurpool=True).eval()
    names = ["tench", "church", "golf ball"]
    M.save_checkpoint(dict(M.OPTIONAL, model=net.state_dict(), args=dict(arch="resnet18", blurpool=True, eval_size=64,
                                                                          tta="flip"),
                           classes=["n01440764", "n03028079", "n03445777"], class_names=names), tmp_path / "c.pt")
    p = run_here(M.main, ["--export", tmp_path / "c.pt", "--out", tmp_path / "x"], capfd)
    assert "model.pt2" in p.stdout
    assert (tmp_path / "x" / "classes.txt").read_text().splitlines() == names
    meta = json.loads((tmp_path / "x" / "model.json").read_text())
    assert (meta["eval_size"], meta["resize_size"]) == (64, 73) and meta["input"].startswith("uint8 (B, 3, 64, 64)")
    import data
    photos = torch.stack([data.eval_transform(64)(data.load_rgb(f)) for f in sorted(SAMPLES.iterdir())[:5]])
    torch.save(photos, tmp_path / "photos.pt")
    alone = ("import sys, torch; sys.path = [p for p in sys.path if p not in ('', '.')]; "
             "program = torch.export.load(sys.argv[1]).module(); x = torch.load(sys.argv[2]); "
             "torch.save([program(x), program(x[:1])], sys.argv[3])")
    run([sys.executable, "-c", alone, str(tmp_path / "x" / "model.pt2"), str(tmp_path / "photos.pt"),
         str(tmp_path / "out.pt")], cwd=tmp_path)
    out, one = torch.load(tmp_path / "out.pt", weights_only=True)
    with torch.no_grad():
        expected = net(M.normalize(photos)).softmax(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(one, expected[:1], rtol=1e-5, atol=1e-6)


def test_one_tta_vocabulary_with_the_old_spellings_kept(tmp_path):
    """TTA is "none" or "flip" in every script and checkpoint (model.TTA). train.py's old --tta / --no-tta still parse
    (run_ec2.sh replays a checkpoint's command line at a resume), and a checkpoint of format 4 or older, whose args
    held a bool, reads as the words."""
    import train
    assert [train.parse_args(flags).tta for flags in ([], ["--tta"], ["--no-tta"], ["--tta", "none"], ["--tta=flip"])] \
        == ["flip", "flip", "none", "none", "flip"]
    for old, word in ((True, "flip"), (False, "none")):
        net = M.build_model("resnet18", num_classes=3)
        M.save_atomic(dict(format=4, model=net.state_dict(), args=dict(arch="resnet18", tta=old, eval_size=64)),
                      tmp_path / "old.pt")
        assert M.read_checkpoint(tmp_path / "old.pt")["args"]["tta"] == word
        assert M.load_checkpoint(tmp_path / "old.pt")[1]["tta"] == word
