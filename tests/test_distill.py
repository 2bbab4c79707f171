"""Distillation (issue 18): the loss by hand, a student equal to its teacher, which parameters
train, distillation lowering the KL on held-back images, unlabelled folders of any layout, and
one-line errors."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert.cli.eval import app as eval_app
from ccnn_convert.cli.train import app as train_app
from ccnn_convert.models import ResolvedModel, load_artifact
from ccnn_convert.models.preprocessing import imagenet_preprocessing
from ccnn_convert.train import EpochRecord, TrainConfig, Trainer, train_model
from ccnn_convert.train.calibrate import recalibrate_batchnorm
from ccnn_convert.train.distill import DistillConfig, DistillTrainer, Teacher, build_teacher, distillation_loss
from ccnn_convert.train.unlabelled import UNLABELLED


def _net(classes: int = 3, batchnorm: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), norm(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), norm(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


NET = '''
import torch
from torch import nn

def make(classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))

def make4():
    return make(4)
'''


def _images(count: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _unlabelled(images: torch.Tensor) -> TensorDataset:
    return TensorDataset(images, torch.full((len(images),), UNLABELLED))


def _distill_trainer(student, teacher_model, train, val, config, distill=DistillConfig(), labelled=False):
    teacher = build_teacher(distill, ResolvedModel.from_module(teacher_model))
    return DistillTrainer(student, train, val, config, teacher=teacher, distill=distill, labelled=labelled,
                          device="cpu")


# --------------------------------------------------------------------------------------------
# the loss


def test_distillation_loss_equals_a_hand_computation():
    student = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    teacher = [[2.0, 0.0, -1.0], [1.0, 1.0, 1.0]]
    t = 2.0

    def softmax(row):
        e = [math.exp(v / t) for v in row]
        return [v / sum(e) for v in e]

    expected = sum(sum(p * (math.log(p) - math.log(q)) for p, q in zip(softmax(tr), softmax(sr)))
                   for sr, tr in zip(student, teacher)) / len(student) * t * t
    loss = distillation_loss(torch.tensor(student), torch.tensor(teacher), temperature=t)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1  # not a vacuous comparison


def test_distill_weight_mixes_in_the_label_loss():
    student, teacher, targets = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([2])
    config = TrainConfig(epochs=1, batch_size=1, label_smoothing=0.0)
    trainer = _distill_trainer(_net(), _net(), _unlabelled(_images(1)), None, config,
                               DistillConfig(weight=0.25, temperature=3.0), labelled=True)
    kd = distillation_loss(student, teacher, 3.0)
    ce = -math.log(math.exp(0.5) / (math.exp(1.0) + math.exp(-2.0) + math.exp(0.5)))
    teacher_log_probs = torch.log_softmax(teacher / 3.0, dim=1)  # the teacher's distribution at T
    assert float(trainer.loss(student, teacher_log_probs, targets)) == pytest.approx(0.25 * float(kd) + 0.75 * ce, rel=1e-6)


def test_a_student_equal_to_its_teacher_has_zero_loss_and_zero_gradients():
    """traditional mode: the student computes what the teacher does (no BatchNorm, whose training
    statistics would differ from the teacher's eval ones); checkered differs and gets gradients."""
    config = TrainConfig(epochs=1, batch_size=4, lr=0.1, weight_decay=0.0, label_smoothing=0.0)
    images, targets = _images(4), torch.full((4,), UNLABELLED)
    for mode, equal in (("traditional", True), ("checkered", False)):
        original = _net(batchnorm=False)
        student = convert(original, mode=mode, example_input=_images(1))
        trainer = _distill_trainer(student, original, _unlabelled(images), None, config)
        loss, agreeing = trainer._step(images, targets)
        grads = [p.grad for p in student.parameters()]
        if equal:
            assert float(loss) == 0.0 and agreeing == 4
            assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
        else:
            assert float(loss) > 0 and any(torch.count_nonzero(g) > 0 for g in grads)


# --------------------------------------------------------------------------------------------
# which parameters train


# _net(): 0 conv, 1 BatchNorm, 3 conv, 4 BatchNorm, 8 Linear (the head)
NORM_KEYS = {f"{i}.{name}" for i in (1, 4) for name in ("weight", "bias", "running_mean", "running_var",
                                                         "num_batches_tracked")}
HEAD_KEYS = {"8.weight", "8.bias"}


@pytest.mark.parametrize("which,changed", [("norm", NORM_KEYS), ("head", HEAD_KEYS),
                                           ("norm+head", NORM_KEYS | HEAD_KEYS)])
def test_train_params_change_only_their_tensors(which, changed):
    original = _net()
    before = {k: v.clone() for k, v in original.state_dict().items()}
    student = convert(original, mode="checkered", example_input=_images(1))  # shares the tensors
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, train_params=which, label_smoothing=0.0)
    data = TensorDataset(_images(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    Trainer(student, data, None, config, device="cpu").train_epoch()
    after = original.state_dict()
    differs = {k for k in before if not torch.equal(before[k], after[k])}
    assert differs == changed


def test_frozen_norm_statistics_stay_while_the_affines_train_against_them():
    """--freeze-norm-stats: running statistics bit-identical after an epoch, affines and head
    changed, and the step's loss is the one the model gives in eval mode (statistics used, not
    re-estimated from the batch), computed by hand."""
    original = _net()
    teacher = _net()  # the same weights, kept apart from the student's shared tensors
    before = {k: v.clone() for k, v in original.state_dict().items()}
    student = convert(original, mode="checkered", example_input=_images(1))
    images = _images(8)
    with torch.no_grad():
        expected = float(distillation_loss(student.eval()(images), teacher.eval()(images)))
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, train_params="norm+head", freeze_norm_stats=True,
                         label_smoothing=0.0)
    loss_sum = _distill_trainer(student, original, _unlabelled(images), None, config).train_epoch()[0]
    differs = {k for k in before if not torch.equal(before[k], original.state_dict()[k])}
    assert differs == {k for k in NORM_KEYS if k.endswith(("weight", "bias"))} | HEAD_KEYS
    assert loss_sum / 8 == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# distillation reduces disagreement


def test_a_few_steps_of_distillation_lower_the_kl_on_held_back_images():
    original = _net()
    images = _images(48) * 0.5 + torch.linspace(-1, 1, 16).view(1, 1, 1, 16)  # some structure
    recalibrate_batchnorm(original, [images])  # a "pretrained" teacher: statistics of these images
    with torch.no_grad():
        original[8].weight.mul_(8)  # confident enough that conversion changes its answers
    student = convert(original, mode="checkered", example_input=_images(1))
    config = TrainConfig(epochs=4, batch_size=8, lr=0.1, augment="none", label_smoothing=0.0)
    trainer = _distill_trainer(student, original, _unlabelled(images[:32]), _unlabelled(images[32:]), config)
    agreement_before, kl_before = trainer.measure_agreement()
    trainer.fit()
    assert kl_before > 0.01
    assert trainer.history[-1].val_kl < 0.8 * kl_before
    assert trainer.history[-1].val_agreement >= agreement_before


# --------------------------------------------------------------------------------------------
# through the command: unlabelled layouts, artifacts, errors


def _png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (36, 36, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def _cli(args):
    result = CliRunner().invoke(train_app, [str(a) for a in args])
    return result.exit_code, result.output


def _distill_args(data, out, *extra):
    return ["net.py:make", "--data", data, "--out", out, "--distill", "--epochs", "1", "--batch-size", "4",
            "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu", *extra]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    return tmp_path


@pytest.mark.parametrize("layout", ["flat", "nested", "mixed"])
def test_unlabelled_folders_train(project, layout):
    folder = project / "photos"
    for i in range(10):
        where = {"flat": f"{i}.png", "nested": f"trip{i % 3}/day{i % 2}/{i}.png",
                 "mixed": f"{'sub/' if i % 2 else ''}{i}.png"}[layout]
        _png(folder / where, i)
    if layout == "mixed":
        (folder / "notes.txt").write_text("not an image")
        (folder / "sub" / "labels.csv").write_text("a,b\n")
        (folder / ".hidden.png").write_text("hidden: left out")
    overrides = ["--train-params", "all", "--no-freeze-norm-stats"] if layout == "nested" else []
    code, out = _cli(_distill_args("photos", "run", *overrides))
    assert code == 0, out
    assert "val agreement" in out and "KL" in out
    summary = load_artifact(project / "run" / "best.pt", trust_factory=True).training
    assert summary["images"] == 9  # 10 images, 1 held back
    assert summary["distilled_from"]["teacher"] == "net.py:make (unconverted)"
    assert summary["val_agreement"] is not None
    recipe = summary["recipe"]
    if overrides:  # given options win over --distill's recipe
        assert recipe["train_params"] == "all" and "freeze_norm_stats" not in recipe
    else:  # --distill's documented defaults (README): norm+head against frozen statistics
        assert recipe["train_params"] == "norm+head" and recipe["freeze_norm_stats"] is True
    assert recipe["epochs"] == 1 and recipe["batch_size"] == 4  # given on the command line


def test_labelled_data_reports_top1_and_agreement(project):
    for split, count in (("train", 4), ("val", 2)):
        for c in ("cat", "dog", "emu"):
            for i in range(count):
                _png(project / "data" / split / c / f"{i}.png", hash((split, c, i)) % 1000)
    code, out = _cli(_distill_args("data", "run", "--distill-weight", "0.5", "--train-params", "norm+head"))
    assert code == 0, out
    assert "val loss" in out and "top-1" in out and "agreement" in out
    summary = load_artifact(project / "run" / "last.pt", trust_factory=True).training
    assert summary["distilled_from"]["weight"] == 0.5 and summary["recipe"]["train_params"] == "norm+head"
    result = CliRunner().invoke(eval_app, ["run/last.pt", "--trust-factory", "--data", "data/val", "--workers", "0",
                                           "--device", "cpu", "--json", "eval.json"])
    assert result.exit_code == 0, result.output
    top1 = {r["mode"]: r["top1"] for r in json.loads((project / "eval.json").read_text())["results"]}
    assert top1["checkered"] == pytest.approx(summary["val_top1"])  # the artifact is the model that was validated


def test_a_resumed_distillation_equals_an_uninterrupted_one(project):
    """The teacher is rebuilt from MODEL's original weights, not from the student being resumed."""
    for i in range(6):  # 5 to train on: one step of 4 per epoch
        _png(project / "photos" / f"{i}.png", i)
    common = dict(config=TrainConfig(epochs=2, batch_size=4, lr=0.05, augment="flip"),
                  distill=DistillConfig(temperature=2.0), preprocessing={"resize": 32, "crop": 32}, workers=0,
                  device="cpu")

    def stop(record):
        raise KeyboardInterrupt

    whole = train_model("net.py:make", project / "photos", project / "whole", **common)
    with pytest.raises(KeyboardInterrupt):
        train_model("net.py:make", project / "photos", project / "split", on_epoch=stop, **common)
    resumed = train_model("net.py:make", project / "photos", project / "split",
                          resume=project / "split" / "checkpoint.pt", **common)
    assert [r.val_kl for r in resumed.history] == [r.val_kl for r in whole.history]
    a = load_artifact(project / "whole" / "last.pt", trust_factory=True).model.state_dict()
    b = load_artifact(project / "split" / "last.pt", trust_factory=True).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_another_teacher_sees_the_images_renormalised_to_its_own_preprocessing():
    student, own = imagenet_preprocessing(), imagenet_preprocessing().with_overrides(mean=(0.5, 0.5, 0.5),
                                                                                    std=(0.25, 0.5, 1.0))
    teacher = Teacher(nn.Flatten(), "flat", 3 * 4, student, own)
    raw = torch.rand(2, 3, 2, 2)
    seen_by_student = (raw - torch.tensor(student.mean).view(1, 3, 1, 1)) / torch.tensor(student.std).view(1, 3, 1, 1)
    expected = (raw - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher(seen_by_student), expected.flatten(1))


@pytest.mark.parametrize("case,message", [
    ("empty", "no image files under"),
    ("text only", "no image files under"),
    ("teacher classes", "the teacher (net.py:make4) has 4 classes and the student 3"),
    ("weight without labels", "--distill-weight 0.5 mixes in the label loss"),
    ("no distill", "--temperature only apply with --distill"),
    ("bad train params", "unknown --train-params 'bias'"),
    ("bad tta", "--teacher-tta takes distinct views from flip, shift, got 'flip,zoom'"),
    ("ensemble classes", "the teachers net.py:make, net.py:make4 score 3, 4 classes"),
    ("two mixes", "--augment 'mixup,cutmix' names more than one per-image augmentation or more than one batch mix"),
])
def test_bad_input_is_one_line(project, case, message):
    folder = project / "photos"
    folder.mkdir()
    if case == "text only":
        (folder / "readme.txt").write_text("no pictures here")
    elif case != "empty":
        for i in range(6):
            _png(folder / f"{i}.png", i)
    extra = {"teacher classes": ["--teacher", "net.py:make4"], "weight without labels": ["--distill-weight", "0.5"],
             "bad train params": ["--train-params", "bias"], "bad tta": ["--teacher-tta", "flip,zoom"],
             "ensemble classes": ["--teacher", "net.py:make,net.py:make4"],
             "two mixes": ["--augment", "mixup,cutmix"]}.get(case, [])
    args = _distill_args("photos", "run", *extra)
    if case == "no distill":
        args = [a for a in args if a != "--distill"] + ["--temperature", "2"]
    code, out = _cli(args)
    assert code == 2, out
    assert message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert not (project / "run").exists()


# --------------------------------------------------------------------------------------------
# function matching (issue 23): one augmented tensor for both, mixed labels only when read,
# the teacher averaged over views and models, the untrained conversion kept when it is better


class _Pictures(torch.utils.data.Dataset):
    """PIL images through a transform, unlabelled (as unlabelled_sets gives them)."""

    def __init__(self, count: int, transform):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)) for _ in range(count)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), UNLABELLED


def _inputs_of(module: nn.Module, seen: list) -> None:
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().clone()))


@pytest.mark.parametrize("augment", ["strong,mixup", "standard,cutmix"])
def test_teacher_and_student_receive_the_identical_augmented_tensor(augment):
    from ccnn_convert.train.data import train_transform

    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, augment=augment, label_smoothing=0.0)
    pre = imagenet_preprocessing().with_overrides(resize=32, crop=32)
    original = _net()
    student = convert(original, mode="checkered", example_input=_images(1, 32))
    trainer = _distill_trainer(student, original, _Pictures(8, train_transform(pre, config)), None, config)
    to_student, to_teacher = [], []
    _inputs_of(student, to_student)
    _inputs_of(trainer.teacher.members[0].model, to_teacher)
    trainer.fit()
    assert len(to_student) == len(to_teacher) == 4  # 2 epochs of 2 steps
    for a, b in zip(to_student, to_teacher):
        assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(to_student[0], to_student[2])  # the same images, augmented anew each epoch


def _one_hot_pixel_images(count: int) -> torch.Tensor:
    """Image i is 1 at pixel i and 0 elsewhere: a mixed image shows its label mix in its pixels."""
    images = torch.zeros(count, 3, 4, 4)
    for i in range(count):
        images[i, :, i // 4, i % 4] = 1.0
    return images


@pytest.mark.parametrize("kind", ["trainer", "distill weight 0.5"])
def test_mixup_mixes_the_labels_as_it_mixes_the_images(kind):
    """Labels 0..3 of a 6-class model; image i is a one-hot pixel, so the mixed input's first four
    pixels are the mixed label, computed independently of the mixing code."""
    images, labels = _one_hot_pixel_images(4), torch.arange(4)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, augment="none,mixup", label_smoothing=0.0)
    original = _net(classes=6)
    data = TensorDataset(images, labels)
    if kind == "trainer":
        trainer = Trainer(original, data, None, config, device="cpu")
    else:
        student = convert(original, mode="traditional", example_input=_images(1, 4))
        trainer = _distill_trainer(student, _net(classes=6), data, None, config, DistillConfig(weight=0.5),
                                   labelled=True)
    seen, targets = [], []
    _inputs_of(trainer.model, seen)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda logits, t: targets.append(t) or loss_fn(logits, t)
    torch.manual_seed(3)
    trainer.train_epoch()
    mixed = seen[0]
    expected = torch.zeros(4, 6)
    expected[:, :4] = mixed[:, 0].flatten(1)[:, :4]
    assert not torch.equal(mixed, images)  # a real mix (the weight is drawn, not 1)
    torch.testing.assert_close(targets[0], expected)


def test_mixup_labels_are_never_read_at_distill_weight_1():
    images, labels = _one_hot_pixel_images(4), torch.arange(4)
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, augment="none,mixup", label_smoothing=0.0)
    for labelled in (True, False):
        student = convert(_net(classes=6), mode="checkered", example_input=_images(1, 4))
        trainer = _distill_trainer(student, _net(classes=6), TensorDataset(images, labels), None, config,
                                   DistillConfig(weight=1.0), labelled=labelled)
        seen = []
        _inputs_of(trainer.model, seen)

        def read(*_):
            raise AssertionError("the label loss ran")

        trainer.loss_fn = read
        trainer.train_epoch()
        assert not torch.equal(seen[0], images)  # mixed all the same


def _shifted_by_hand(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[y, x] = images[clamp(y - dy), clamp(x - dx)], index by index."""
    height, width = images.shape[-2:]
    rows = [min(max(y - dy, 0), height - 1) for y in range(height)]
    cols = [min(max(x - dx, 0), width - 1) for x in range(width)]
    return images[:, :, rows][:, :, :, cols]


def _mean_softmax(logits: list[torch.Tensor], t: float) -> torch.Tensor:
    return sum(torch.softmax(z / t, dim=1) for z in logits) / len(logits)


def test_a_teacher_with_tta_is_the_mean_of_its_views_softmax():
    from ccnn_convert.train.distill import TTA_SHIFT, kl_to_teacher

    model = _net().eval()
    with torch.no_grad():
        model[8].weight.mul_(30)  # confident: averaging logits would then differ from averaging softmaxes
    images, t = _images(2, 24), 2.0
    teacher = build_teacher(DistillConfig(teacher_tta=("shift", "flip")), ResolvedModel.from_module(copy.deepcopy(model)))
    with torch.no_grad():
        views = []
        for flipped in (images, torch.flip(images, dims=[3])):
            views += [_shifted_by_hand(flipped, dy, dx) for dy, dx in
                      ((0, 0), (TTA_SHIFT, 0), (-TTA_SHIFT, 0), (0, TTA_SHIFT), (0, -TTA_SHIFT))]
        logits = [model(v) for v in views]
        expected = _mean_softmax(logits, t)
    assert len({float(z.sum()) for z in logits}) == 10  # ten different views
    torch.testing.assert_close(teacher.log_probs(images, t).exp(), expected, rtol=1e-5, atol=1e-7)
    mean_logits = torch.softmax(torch.stack(logits).mean(0) / t, dim=1)
    assert not torch.allclose(mean_logits, expected, atol=1e-4)  # softmaxes averaged, not logits
    student = torch.randn(2, 3)
    by_hand = (expected * (expected.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    torch.testing.assert_close(kl_to_teacher(student, teacher.log_probs(images, t), t), by_hand, rtol=1e-5, atol=0)


NETS_B = NET + '''

def make_b():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
'''


def test_an_ensemble_teacher_is_the_mean_of_its_models_softmax(project):
    (project / "net.py").write_text(NETS_B)
    namespace: dict = {}
    exec(NETS_B, namespace)
    models = [namespace["make"]().eval(), namespace["make_b"]().eval()]
    images = _images(3, 16)
    config = DistillConfig(teacher=("net.py:make", "net.py:make_b"), teacher_tta=("flip",))
    teacher = build_teacher(config, ResolvedModel.from_module(_net()))
    with torch.no_grad():
        logits = [m(v) for m in models for v in (images, torch.flip(images, dims=[3]))]
    assert not torch.allclose(logits[0], logits[2])  # two different models
    torch.testing.assert_close(teacher.log_probs(images, 1.0).exp(), _mean_softmax(logits, 1.0), rtol=1e-5, atol=1e-7)
    assert teacher.name == "the mean of net.py:make, net.py:make_b over views flip"


def _dropout_net() -> nn.Sequential:
    net = _net()
    net.insert(8, nn.Dropout(0.5))
    return net


def test_the_teacher_stays_in_eval_mode_whatever_train_is_called_with():
    """Planted bug (issue 24): Teacher.train(True) putting the teacher into training mode."""
    teacher = build_teacher(DistillConfig(), ResolvedModel.from_module(_dropout_net()))
    reference = _dropout_net().eval()
    images = _images(4)
    for member in (teacher.members[0], teacher):
        member.train(True)
        assert not any(m.training for m in teacher.modules())
        torch.testing.assert_close(teacher.log_probs(images), torch.log_softmax(reference(images), 1))


def test_a_teacher_built_from_a_model_in_training_mode_does_not_move():
    """Planted bug (issue 24): build_teacher leaving the teacher's model in training mode, where
    its BatchNorm statistics would follow the batches and dropout would drop."""
    single = Teacher(_dropout_net().train(), "net", 3, imagenet_preprocessing(), imagenet_preprocessing())  # as build_teacher makes it
    assert not any(m.training for m in single.model.modules())
    resolved = ResolvedModel.from_module(_dropout_net())
    resolved.model.train()
    teacher = build_teacher(DistillConfig(), resolved)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = _images(8)
    student = convert(_dropout_net(), mode="checkered", example_input=_images(1))
    config = TrainConfig(epochs=1, batch_size=4, lr=0.1, augment="none", label_smoothing=0.0)
    trainer = DistillTrainer(student, _unlabelled(images), None, config, teacher=teacher, distill=DistillConfig(),
                             labelled=False, device="cpu")
    trainer.fit()
    assert not any(m.training for m in teacher.modules())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    torch.testing.assert_close(teacher.log_probs(images), torch.log_softmax(_dropout_net().eval()(images), 1))


def _record(agreement, kl, top1=None):
    return EpochRecord(1, 0.1, 50.0, None, top1, None, 0.01, 1.0, 1.0, None, val_agreement=agreement, val_kl=kl)


def test_the_untrained_conversion_wins_only_when_it_agrees_more():
    from ccnn_convert.train.distill import HeldBackScore, untrained_is_better

    untrained = HeldBackScore(None, 90.0, 0.2)
    assert untrained_is_better(untrained, _record(80.0, 0.1))
    assert not untrained_is_better(untrained, _record(95.0, 0.3))
    assert untrained_is_better(untrained, _record(90.0, 0.3))  # equal agreement: the lower KL
    assert not untrained_is_better(untrained, _record(90.0, 0.1))
    assert not untrained_is_better(HeldBackScore(40.0, 90.0, 0.2), _record(80.0, 0.3, top1=50.0))  # labels rank


def test_training_that_makes_it_worse_keeps_the_untrained_conversion_as_best(project, caplog):
    """traditional mode: the untrained student is its teacher (agreement 100 %, KL 0); a huge
    learning rate moves it away, so best.pt must be the untrained network and the run says so."""
    for i in range(8):
        _png(project / "photos" / f"{i}.png", i)
    code, out = _cli(_distill_args("photos", "run", "--mode", "traditional", "--lr", "50", "--val-fraction", "0.25",
                                   "--augment", "flip", "--train-params", "all", "--no-freeze-norm-stats", "--epochs", "2"))
    assert code == 0, out
    assert "best.pt is the untrained conversion" in caplog.text  # the CLI prints it as one line on stderr
    assert "best: untrained" in out and "untrained" in out.split("best: untrained")[0]
    best = load_artifact(project / "run" / "best.pt", trust_factory=True)
    last = load_artifact(project / "run" / "last.pt", trust_factory=True)
    namespace: dict = {}
    exec(NET, namespace)
    original = namespace["make"]().state_dict()
    assert all(torch.equal(best.model.state_dict()[k], v) for k, v in original.items())
    assert not all(torch.equal(last.model.state_dict()[k], v) for k, v in original.items())
    assert best.training["untrained"] is True and best.training["val_agreement"] == 100.0
    assert best.training["val_kl"] == pytest.approx(0.0, abs=1e-6)


def test_the_recipe_is_the_mode_s_own_and_an_artifact_s_mode_chooses_it(project):
    from ccnn_convert.cli.convert import app as convert_app
    from ccnn_convert.train.distill import distill_recipe, recipe_mode

    result = CliRunner().invoke(convert_app, ["net.py:make", "--mode", "blurpool", "--input-size", "32", "-o", "b.pt"])
    assert result.exit_code == 0, result.output
    assert recipe_mode("b.pt", None) == "blurpool" and recipe_mode("b.pt", "checkered") == "checkered"
    assert recipe_mode("net.py:make", None) == "checkered"
    checkered, blurpool = distill_recipe("checkered"), distill_recipe("blurpool")
    assert checkered["freeze_norm_stats"] and checkered["augment"] == "strong,mixup"  # function matching
    assert blurpool["freeze_norm_stats"] and blurpool["augment"] == "standard"  # what measured best there
    assert (checkered["recalibrate"], blurpool["recalibrate"]) == ("auto", "none")
