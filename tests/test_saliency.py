"""The exported ONNX graphs against PyTorch: logits, and saliency maps against autograd oracles."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import build_model
from models.graphs import EMBEDDING_MAX_DIMS, ClassifierGraph, embedding_projection, fold_adaptive_pool, penultimate
from models.saliency import METHODS, SaliencyGraph
from pipeline.common.contract import CLASSIFIER_OUTPUTS
from pipeline.lib.onnx_checks import check_saliency_finite, degenerate_inputs
from pipeline.lib.onnx_export import export_onnx

SALIENCY_OUTPUTS = ["logits", "gradient", "guided", "gradcam"]


@dataclass(frozen=True)
class Case:
    model: str
    channels: int
    size: int
    classes: int
    cam_layer: int  # index in model.features of the Grad-CAM activation, written out independently

    @property
    def mean(self) -> list[float]:
        return [0.45, 0.5, 0.55][: self.channels]

    @property
    def std(self) -> list[float]:
        return [0.22, 0.25, 0.28][: self.channels]


CASES = {
    # features: conv, tanh, pool, conv, tanh(4), pool
    "lenet5": Case("lenet5", channels=1, size=32, classes=10, cam_layer=4),
    # features: 13 × (conv, relu) with 5 pools; features[29] is the ReLU before the last pool
    "vgg16": Case("vgg16", channels=3, size=32, classes=10, cam_layer=29),
    # what the real models leave out: see TinyNet
    "tiny": Case("tiny", channels=3, size=30, classes=6, cam_layer=6),
}


class TinyNet(nn.Module):
    """Every layer rule in a small net, in the cases the real models at their sizes never hit:
    strided convs with a non-zero output_padding (30 → 15 and 8 → 4), overlapping max-pool
    windows, BatchNorm with non-trivial statistics, a 4×4 → 3×3 adaptive pool (overlapping bins)."""

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # 15×15
            nn.MaxPool2d(3, stride=2, padding=1),  # 8×8
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),  # 4×4
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 9, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, classes)
        )
        for bn in (self.features[1], self.features[5]):
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.normal_(bn.bias, 0, 0.1)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def make_model(case: Case) -> nn.Module:
    """The seeded model in eval mode: the oracles run it directly, and VGG16's Dropout must be off
    (SaliencyGraph puts a model in eval mode itself, but the graph is built from a folded copy)."""
    torch.manual_seed(0)
    if case.model == "tiny":
        return TinyNet(case.channels, case.classes).eval()
    return build_model(case.model, case.classes, case.channels, case.size).eval()


def images(case: Case, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, case.channels, case.size, case.size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- torch oracles
# They run in the model's dtype: the tests use float64 copies, so the oracle is more exact
# than the float32 graph it checks.
def _selected_logit(model: nn.Module, image: torch.Tensor, target: torch.Tensor, case: Case):
    """0–1 input (requires grad), logits and the sum of the target logits."""
    dtype = next(model.parameters()).dtype
    x01 = (image.to(dtype) / 255).requires_grad_(True)
    # mean/std rounded to float32 first, as the graphs store them
    mean = torch.tensor(case.mean).to(dtype).view(1, -1, 1, 1)
    std = torch.tensor(case.std).to(dtype).view(1, -1, 1, 1)
    logits = model((x01 - mean) / std)
    target = torch.where(target < 0, logits.argmax(dim=1), target)
    return x01, logits, logits.gather(1, target[:, None]).sum()


def reference_maps(model: nn.Module, image: torch.Tensor, target: torch.Tensor, case: Case):
    """(logits, gradient, guided, gradcam) from autograd, a forward hook and backward hooks."""
    captured = {}
    handle = model.features[case.cam_layer].register_forward_hook(lambda m, i, out: captured.update(act=out))
    try:
        x01, logits, score = _selected_logit(model, image, target, case)
    finally:
        handle.remove()
    act = captured["act"]
    gradient, act_grad = torch.autograd.grad(score, [x01, act])
    cam = (act_grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True).relu()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak, 0)  # the definition: an all-zero map stays zero

    # Guided backprop: every ReLU/Tanh passes on only the positive part of its input gradient.
    hooks = [
        m.register_full_backward_hook(lambda m, grad_in, grad_out: (grad_in[0].clamp(min=0),))
        for m in model.modules()
        if isinstance(m, (nn.ReLU, nn.Tanh))
    ]
    try:
        x01, _, score = _selected_logit(model, image, target, case)
        (guided,) = torch.autograd.grad(score, [x01])
    finally:
        for h in hooks:
            h.remove()
    return logits.detach(), gradient, guided, cam.detach()


def map_errors(
    actual: np.ndarray | torch.Tensor, expected: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image cosine similarity and relative L2 error.

    An all-zero reference (Grad-CAM where no location weighs positively, a zero seed) has neither
    direction nor scale: there the map must be exactly zero too, scored cosine 1 and error 0,
    else cosine 0 and error inf, which no tolerance passes. Exactly, because float32 reproduces
    those zeros exactly (a ReLU cut, a zero product) and Grad-CAM scales any residue up to max 1.
    """
    a = torch.as_tensor(actual).double().flatten(1)
    e = expected.double().flatten(1)
    assert a.shape == e.shape, what
    norm = e.norm(dim=1)
    zero = norm == 0
    hit = zero & (a == 0).all(dim=1)
    cosine = torch.where(zero, hit.double(), F.cosine_similarity(a, e, dim=1))
    rel_l2 = (a - e).norm(dim=1) / torch.where(zero, 1, norm)
    return cosine, torch.where(zero, torch.where(hit, 0.0, torch.inf), rel_l2)


def targets_for(kind: str, batch: int, classes: int) -> torch.Tensor:
    return torch.arange(batch) * 3 % classes if kind == "given" else torch.full((batch,), -1)


# ----------------------------------------------------------------------------- fixtures
# VGG16 cases are the slow tier: the fast tier keeps LeNet-5 and TinyNet (strided and
# overlapping pools, BN, overlapping adaptive bins), which exercise every backward rule.
@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow) if name == "vgg16" else name
                                        for name in CASES])
def saliency_export(request, tmp_path_factory):
    """(case, float32 model, its float64 copy, session of the exported float32 saliency graph, its path).

    The graph is built as the export stage builds it, from the pool-folded model (VGG16 at 32 px
    folds; the oracles run the unfolded one), so the parity tests cover what ships."""
    case = CASES[request.param]
    model = make_model(case)
    graph = SaliencyGraph(fold_adaptive_pool(model, case.size), case.mean, case.std, case.size)
    path = tmp_path_factory.mktemp(case.model) / "saliency.onnx"
    export_onnx(graph, path, (images(case, 2, seed=1), torch.tensor([-1, 1])), ["image", "target"],
                SALIENCY_OUTPUTS, {"model": case.model})
    assert [p.name for p in path.parent.iterdir()] == ["saliency.onnx"]  # one file: no external data
    model64 = copy.deepcopy(model).double()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return case, model, model64, session, path


# ----------------------------------------------------------------------------- tests
def test_backward_rules_match_autograd(saliency_export) -> None:
    # The hand-written backward in float64 against autograd in float64: no rounding near
    # ReLU/max-pool kinks to excuse, so the maps must agree to rounding error.
    case, _, model64, _, _ = saliency_export
    graph64 = SaliencyGraph(model64, case.mean, case.std, case.size).double()
    image, target = images(case, 3, seed=3), torch.tensor([-1, 3, 5])
    with torch.no_grad():
        outputs = graph64(image, target)
    expected = reference_maps(model64, image, target, case)
    torch.testing.assert_close(outputs[0], expected[0], rtol=1e-10, atol=1e-10)
    for what, actual, ref in zip(SALIENCY_OUTPUTS[1:], outputs[1:], expected[1:], strict=True):
        _, rel_l2 = map_errors(actual, ref, what)
        assert (rel_l2 <= 1e-9).all(), f"{what}: relative L2 {rel_l2.tolist()}"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("targets", ["given", "predicted"])
def test_saliency_onnx_matches_autograd(saliency_export, batch: int, targets: str) -> None:
    case, _, model64, session, _ = saliency_export
    image, target = images(case, batch, seed=batch), targets_for(targets, batch, case.classes)
    logits, gradient, guided, gradcam = session.run(
        SALIENCY_OUTPUTS, {"image": image.numpy(), "target": target.numpy()}
    )
    expected = reference_maps(model64, image, target, case)

    np.testing.assert_allclose(logits, expected[0].numpy(), rtol=0, atol=1e-4)
    assert gradient.shape == guided.shape == (batch, case.channels, case.size, case.size)
    assert gradcam.shape == (batch, case.size, case.size)
    peak = expected[3].flatten(1).amax(dim=1).numpy()  # 1, or 0 where the reference map is all zero
    assert gradcam.min() >= 0 and np.allclose(gradcam.max(axis=(1, 2)), peak, rtol=0, atol=1e-5)
    for what, actual, ref in zip(SALIENCY_OUTPUTS[1:], (gradient, guided, gradcam), expected[1:], strict=True):
        cosine, rel_l2 = map_errors(actual, ref, what)
        strict = (cosine >= 0.9999) & (rel_l2 <= 1e-2)
        # Where a float32 pre-activation lies within rounding of zero, float32 picks a side of the
        # ReLU/max-pool kink at random (torch's own float32 autograd misses the float64 gradient
        # on ~4% of random VGG16 inputs): allow one such image per 8, and only a small miss.
        # Any wrong backward rule fails every image by far more.
        assert (cosine >= 0.999).all() and (rel_l2 <= 5e-2).all(), f"{what}: {cosine=} {rel_l2=}"
        assert (~strict).sum() <= batch // 8, f"{what}: cosine {cosine.tolist()}, rel. L2 {rel_l2.tolist()}"


def test_predicted_target_is_the_argmax(saliency_export) -> None:
    case, _, _, session, _ = saliency_export
    image = images(case, 4, seed=5).numpy()
    logits, *maps = session.run(SALIENCY_OUTPUTS, {"image": image, "target": np.full(4, -1)})
    _, *explicit = session.run(SALIENCY_OUTPUTS, {"image": image, "target": logits.argmax(1)})
    for a, b in zip(maps, explicit, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["lenet5", pytest.param("vgg16", marks=pytest.mark.slow)])
def test_classifier_onnx_matches_torch(tmp_path: Path, name: str) -> None:
    # Built as the export stage builds it (VGG16 at 32 px: pool folded into fc1), compared with
    # the model as trained.
    case = CASES[name]
    model = make_model(case).eval()
    graph = ClassifierGraph(fold_adaptive_pool(model, case.size), case.mean, case.std)
    path = tmp_path / "classifier.onnx"
    metadata = {"classes": '["a", "b"]', "image_size": str(case.size)}
    export_onnx(graph, path, (images(case, 2, seed=0),), ["image"], list(CLASSIFIER_OUTPUTS), metadata)

    assert {p.key: p.value for p in onnx.load(path).metadata_props} == metadata
    if name == "vgg16":  # fc1 folded: 512 inputs instead of 25,088, so ~120 MB of weights, not ~540 MB
        assert path.stat().st_size < 200e6
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # one export, two batch sizes: the batch axis is dynamic
        image = images(case, batch, seed=batch)
        logits, probabilities, embedding = session.run(list(CLASSIFIER_OUTPUTS), {"image": image.numpy()})
        mean = torch.tensor(case.mean).view(1, -1, 1, 1)
        std = torch.tensor(case.std).view(1, -1, 1, 1)
        with torch.no_grad():
            ref = model((image.float() / 255 - mean) / std)
            features = penultimate(model, (image.float() / 255 - mean) / std)
        np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(probabilities, ref.softmax(1).numpy(), rtol=0, atol=1e-6)
        assert probabilities.shape == (batch, case.classes)
        # The embedding: LeNet-5's 84 penultimate features as they are, VGG16's 4,096 projected to 128.
        projection = embedding_projection(features.shape[1])
        expected = features if projection is None else features @ projection
        assert embedding.shape == (batch, min(features.shape[1], EMBEDDING_MAX_DIMS))
        assert (projection is None) == (name == "lenet5")
        scale = float(np.abs(expected.numpy()).max()) + 1
        np.testing.assert_allclose(embedding, expected.numpy(), rtol=0, atol=1e-5 * scale)


@pytest.mark.slow
def test_fold_adaptive_pool_is_exact() -> None:
    # VGG16 at 64 px: 512×2×2 features replicated to 7×7 → a 2048-input Linear instead of 25088.
    torch.manual_seed(0)
    model = build_model("vgg16", 10, 3, 64).double().eval()
    folded = fold_adaptive_pool(model, 64)
    assert folded is not model and folded.classifier[0].in_features == 512 * 2 * 2
    assert model.classifier[0].in_features == 512 * 7 * 7  # the trained model is left alone
    bn_model = build_model("vgg16_bn", 10, 3, 64).train()
    running_mean = bn_model.features[1].running_mean.clone()
    fold_adaptive_pool(bn_model, 64)
    assert bn_model.training and bn_model.features.training  # its mode too
    assert torch.equal(bn_model.features[1].running_mean, running_mean)  # and its statistics
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    # Nothing to gain: the pool is the identity at 224 px, overlapping bins grow (TinyNet), no pool (LeNet-5).
    unfoldable = [(build_model("vgg16", 10, 3, 224), 224), (TinyNet(3, 6), 30), (build_model("lenet5", 10, 1, 32), 32)]
    for net, size in unfoldable:
        assert fold_adaptive_pool(net, size) is net


def test_method_subsets_match_the_full_graph(saliency_export) -> None:
    # A graph built for some methods computes them exactly as the full graph does (float64: the
    # stacked plain/guided passes and the early stop must not change a single map).
    case, _, model64, _, _ = saliency_export
    image, target = images(case, 3, seed=7), torch.tensor([-1, 2, 4])
    with torch.no_grad():
        full_graph = SaliencyGraph(model64, case.mean, case.std, case.size).double()
        full = dict(zip(SALIENCY_OUTPUTS, full_graph(image, target), strict=True))
        for methods in [("gradient",), ("guided",), ("gradcam",), ("guided", "gradcam"), ("gradcam", "gradient")]:
            graph = SaliencyGraph(model64, case.mean, case.std, case.size, methods).double()
            outputs = graph(image, target)
            assert graph.methods == tuple(m for m in METHODS if m in methods)
            assert len(outputs) == 1 + len(graph.methods)
            for name, actual in zip(("logits", *graph.methods), outputs, strict=True):
                torch.testing.assert_close(actual, full[name], rtol=1e-12, atol=1e-12, msg=f"{methods}: {name}")
    with pytest.raises(ValueError, match="saliency"):
        SaliencyGraph(model64, case.mean, case.std, case.size, ["saliency"])


def test_unsupported_layer_is_refused() -> None:
    model = build_model("lenet5", 10, 1, 32)
    model.features[1] = nn.GELU()
    with pytest.raises(TypeError, match="GELU"):
        SaliencyGraph(model, [0.5], [0.25], 32)


# ----------------------------------------------------------------------------- degenerate inputs
# Two float32 implementations of one graph (PyTorch's kernels, ONNX Runtime's) differ only by the
# order of their sums: a few ulp of a map's scale (at most ~10 seen, Intel and AMD AVX-512).
# 256 ulp leaves room for other kernels; a tie broken the other way or a wrong rule moves a map
# by a sizeable fraction of its scale, ~10^4 times more.
FLOAT32_ULPS = 256


def assert_float32_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """``actual`` within :data:`FLOAT32_ULPS` float32 ulps of each image's largest ``expected`` value."""
    scale = np.abs(expected).reshape(len(expected), -1).max(axis=1).reshape(-1, *[1] * (expected.ndim - 1))
    error = np.abs(actual - expected)
    bound = FLOAT32_ULPS * np.finfo(np.float32).eps * scale
    assert (error <= bound).all(), f"{what}: error {error.max():.3g} > {FLOAT32_ULPS} ulp of the scale"


@pytest.mark.parametrize(
    "saliency_export", ["lenet5", pytest.param("vgg16", marks=pytest.mark.slow), "tiny"], indirect=True
)
def test_saliency_onnx_is_finite_on_degenerate_inputs(saliency_export) -> None:
    # Uniform images have no edges, so whole layers die or saturate together and Grad-CAM is all
    # zero for many targets (seed 0: LeNet-5 17 of 33 uniform maps, TinyNet 7). saliency.onnx
    # once divided 0/0 there, because the exporter's optimizer dropped the `+ 1e-8` of
    # `cam / (max + 1e-8)`. Every target and -1.
    #
    # The reference is the exported graph itself run by PyTorch in float32, not the float64
    # oracle: on a flat image every position ties, and which side of a tie or a ReLU kink float32
    # lands on depends on the CPU's kernels (an AMD EPYC's float32 gradient had cosine 0.91 to
    # float64's on the white image, while ONNX matched float32 PyTorch bit for bit). The backward
    # rules themselves are checked in float64 and on ordinary images by the tests above.
    case, model, _, session, _ = saliency_export
    graph = SaliencyGraph(fold_adaptive_pool(model, case.size), case.mean, case.std, case.size)
    targets = torch.arange(-1, case.classes)
    zero_cams = []
    for name, single in degenerate_inputs(case.channels, case.size).items():
        image = torch.from_numpy(single).repeat(len(targets), 1, 1, 1)
        outputs = session.run(SALIENCY_OUTPUTS, {"image": image.numpy(), "target": targets.numpy()})
        for what, actual in zip(SALIENCY_OUTPUTS, outputs, strict=True):
            assert np.isfinite(actual).all(), f"{name} image: {what} not finite for targets {targets.tolist()}"
        guided_gradcam = outputs[2] * outputs[3][:, None]  # what the service shows as guided Grad-CAM
        assert np.isfinite(guided_gradcam).all(), f"{name} image: guided*gradcam not finite"

        with torch.no_grad():
            expected = [t.numpy() for t in graph(image, targets)]
        for what, actual, ref in zip(SALIENCY_OUTPUTS, outputs, expected, strict=True):
            assert_float32_close(actual, ref, f"{name} image: {what}")
        # An all-zero Grad-CAM stays exactly zero (no residue scaled up to 1, no 0/0).
        zero = (expected[3].reshape(len(targets), -1) == 0).all(axis=1)
        assert not outputs[3][zero].any(), f"{name} image: an all-zero Grad-CAM is not zero in ONNX"
        zero_cams += [(name, t) for t in targets[torch.from_numpy(zero)].tolist()]
    # The case this test exists for: should a new seed or torch version stop producing all-zero
    # references, it fails here instead of silently no longer covering 0/0.
    assert zero_cams, f"{case.model}: no all-zero Grad-CAM reference among the degenerate inputs"


def test_out_of_range_target_gives_zero_maps(saliency_export) -> None:
    # The forward docstring's promise; its Grad-CAM is the 0/0 case for every image.
    case, _, _, session, _ = saliency_export
    image = images(case, 2, seed=11).numpy()
    logits, *maps = session.run(SALIENCY_OUTPUTS, {"image": image, "target": np.array([case.classes, 1000])})
    assert np.isfinite(logits).all()
    for what, actual in zip(SALIENCY_OUTPUTS[1:], maps, strict=True):
        assert np.array_equal(actual, np.zeros_like(actual)), what  # also False for NaN


def test_check_saliency_finite_passes_on_the_export(saliency_export) -> None:
    case, *_, path = saliency_export
    check_saliency_finite(path, case.classes, case.channels, case.size)


def test_check_saliency_finite_catches_the_lost_epsilon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The bug itself: Grad-CAM normalised by `max + 1e-8` exports as max alone (the onnxscript
    # optimizer's `x + 0 → x` rule matches constants within 1e-8 of zero) and divides 0/0. The
    # graph computes it correctly in PyTorch; only the exported file is broken, and the check sees it.
    case = CASES["lenet5"]
    monkeypatch.setattr("models.saliency._nonzero", lambda peak: peak + 1e-8)
    graph = SaliencyGraph(make_model(case), case.mean, case.std, case.size, ["gradcam"])
    image = torch.from_numpy(degenerate_inputs(case.channels, case.size)["black"])
    with torch.no_grad():
        assert torch.isfinite(graph(image, torch.tensor([0]))[1]).all()
    path = tmp_path / "saliency.onnx"
    export_onnx(graph, path, (images(case, 2, seed=1), torch.tensor([-1, 1])), ["image", "target"],
                ["logits", "gradcam"], {})
    assert "Add" not in {node.op_type for node in onnx.load(path).graph.node}  # the epsilon is gone
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (gradcam,) = session.run(["gradcam"], {"image": image.numpy(), "target": np.array([0])})
    assert np.isnan(gradcam).all()  # black image, target 0: an all-zero map (see the test above)


def broken_saliency_onnx(path: Path, defect: str) -> Path:
    """A stand-in ``saliency.onnx`` with the real inputs and outputs (image uint8 [N, C, H, W],
    target int64 [N] → logits, gradient, guided, gradcam [N, H, W]), finite everywhere except
    for the black image with target 2, where ``s = max(image) + |target - 2|`` is 0.

    ``defect="nan"``: Grad-CAM is multiplied by s / s, i.e. divides 0/0 there. ``"overflow"``:
    guided and Grad-CAM get s == 0 ? 1e38 : 0 added, each finite, their product inf.
    """
    from onnx import TensorProto, helper

    def const(name: str, value: list, dtype: int = TensorProto.FLOAT) -> onnx.TensorProto:
        return helper.make_tensor(name, dtype, [len(value)], value)

    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["x", "c255"], ["gradient"]),
        helper.make_node("ReduceMax", ["x", "axes_chw"], ["peak"], keepdims=1),  # (N, 1, 1, 1)
        helper.make_node("Cast", ["target"], ["t"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["t", "shape_n1"], ["logits"]),
        helper.make_node("Sub", ["t", "c2"], ["t_off"]),
        helper.make_node("Abs", ["t_off"], ["t_abs"]),
        helper.make_node("Reshape", ["t_abs", "shape_n111"], ["t4"]),
        helper.make_node("Add", ["peak", "t4"], ["s"]),  # 0 only for the black image, target 2
        helper.make_node("ReduceMean", ["gradient", "axes_c"], ["mean"], keepdims=1),  # (N, 1, H, W)
    ]
    if defect == "nan":
        nodes += [helper.make_node("Div", ["s", "s"], ["factor"]),  # 0/0
                  helper.make_node("Mul", ["mean", "factor"], ["cam4"]),
                  helper.make_node("Identity", ["gradient"], ["guided"])]
    else:
        nodes += [helper.make_node("Equal", ["s", "c0"], ["hit"]),
                  helper.make_node("Where", ["hit", "c1e38", "c0"], ["big"]),
                  helper.make_node("Add", ["mean", "big"], ["cam4"]),
                  helper.make_node("Add", ["gradient", "big"], ["guided"])]
    nodes.append(helper.make_node("Squeeze", ["cam4", "axes_c"], ["gradcam"]))
    initializers = [
        const("c255", [255.0]), const("c2", [2.0]), const("c0", [0.0]), const("c1e38", [1e38]),
        const("axes_chw", [1, 2, 3], TensorProto.INT64), const("axes_c", [1], TensorProto.INT64),
        const("shape_n1", [-1, 1], TensorProto.INT64), const("shape_n111", [-1, 1, 1, 1], TensorProto.INT64),
    ]
    nchw = ["N", "C", "H", "W"]
    graph = helper.make_graph(
        nodes, "broken_saliency",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, nchw),
         helper.make_tensor_value_info("target", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1]),
         helper.make_tensor_value_info("gradient", TensorProto.FLOAT, nchw),
         helper.make_tensor_value_info("guided", TensorProto.FLOAT, nchw),
         helper.make_tensor_value_info("gradcam", TensorProto.FLOAT, ["N", "H", "W"])],
        initializers,
    )
    # IR 8 (opset 18's own): onnx's default IR version can be newer than ONNX Runtime reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(("defect", "output"), [("nan", "gradcam"), ("overflow", "guided*gradcam")])
def test_check_saliency_finite_catches_non_finite(tmp_path: Path, defect: str, output: str) -> None:
    path = broken_saliency_onnx(tmp_path / "saliency.onnx", defect)
    # The defect is where it should be, and only there: black image, target 2.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    black = degenerate_inputs(3, 8)["black"].repeat(2, axis=0)
    _, _, guided, gradcam = session.run(SALIENCY_OUTPUTS, {"image": black, "target": np.array([1, 2])})
    with np.errstate(over="ignore"):
        product = guided * gradcam[:, None]
    assert np.isfinite(product[0]).all() and not np.isfinite(product[1]).all()
    assert np.isfinite(gradcam[0]).all() and np.isfinite(gradcam).all() == (defect == "overflow")

    message = f"{path}: saliency.onnx yields non-finite values for the black image, target 2, output {output}"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_saliency_finite(path, num_classes=4, channels=3, image_size=8)
    check_saliency_finite(path, num_classes=2, channels=3, image_size=8)  # targets 0, 1, -1 never reach it
