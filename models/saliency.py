"""The saliency graph: the backward pass written as tensor ops, so it exports to ONNX.

``torch.autograd.grad`` cannot be exported, so :class:`SaliencyGraph` writes the backward pass
out as ordinary tensor ops, layer by layer, over the model's ``features`` → ``avgpool`` →
flatten → ``classifier`` sequence (see DESIGN.md, "How saliency gets into ONNX"):

=================  ==========================================================================
layer              gradient rule (g = gradient w.r.t. the layer's output, y = its output)
=================  ==========================================================================
Linear             ``g @ W``
ReLU / Tanh        ``g * (y > 0)`` / ``g * (1 - y²)``; guided: then ``clamp(min=0)``
Conv2d             ``conv_transpose2d`` with the same weight, stride, padding, dilation and
                   the ``output_padding`` that restores the input size
MaxPool2d          windows that tile the input (kernel == stride, VGG16, LeNet-5): the gradient
                   goes to each window's first maximum, found with nearest upsampling and a
                   plain MaxPool; other windows: forward with ``return_indices=True``, backward
                   ``scatter_add`` into zeros (accumulates where windows overlap, like autograd)
AdaptiveAvgPool2d  a constant matrix P (fixed feature size): forward ``x @ Pᵀ``, backward ``g @ P``
BatchNorm2d        ``g * weight / sqrt(running_var + eps)`` (eval statistics)
Dropout, Identity  identity; Flatten → reshape
=================  ==========================================================================

Conventions of the outputs:

* ``gradient`` and ``guided`` are derivatives of the target class *logit* with respect to the
  image scaled to 0–1 (``uint8 / 255``), i.e. chained through the mean/std normalisation.
* Guided backpropagation (Springenberg et al. 2015) lets only positive gradient signals
  through every nonlinearity: at a ReLU ``(g * (y > 0)).clamp(min=0)``. We apply the same
  rule at Tanh, ``(g * (1 - y²)).clamp(min=0)``, so LeNet-5 gets a guided map too.
* Grad-CAM (Selvaraju et al. 2017) is taken at the output of the last activation that follows
  the last Conv2d in ``features``; it is upsampled bilinearly to the input and divided by its
  per-image maximum, so it lies in [0, 1]; a map that is all zero (no location weighs
  positively) stays all zero.

The uint8 input and the normalisation come from :mod:`models.graphs`; writing the ONNX file is
:mod:`pipeline.lib.onnx_export`'s job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from models.graphs import Normalize

# Layers SaliencyGraph knows how to differentiate; anything else is refused at construction.
METHODS = ("gradient", "guided", "gradcam")  # saliency.onnx outputs after logits, in this order

_SUPPORTED = (
    nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Tanh, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
    nn.Dropout, nn.Identity, nn.Flatten, nn.Linear,
)


class SaliencyGraph(nn.Module):
    """``saliency.onnx``: (uint8 image, int64 target) → (logits, gradient, guided, gradcam).

    Puts ``model`` in eval mode and freezes its parameters. With ``methods`` a subset, the
    graph computes and returns only those maps after the logits, in :data:`METHODS` order.

    Args:
        model: a network with ``features`` and ``classifier`` (``nn.Sequential``) and an optional
            ``avgpool``, whose forward is features → avgpool → flatten → classifier.
        mean: per-channel mean of the training images, 0–1 scale.
        std: per-channel standard deviation, 0–1 scale.
        image_size: the square input side the graph is built for; fixes every feature-map size
            (conv output paddings, the adaptive-pool matrix).
        methods: the maps to compute, a non-empty subset of :data:`METHODS` (default all).
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], image_size: int,
        methods: Sequence[str] = METHODS,
    ) -> None:
        super().__init__()
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            raise ValueError(f"SaliencyGraph methods must be a non-empty subset of {METHODS}, got {list(methods)}")
        self.methods = tuple(m for m in METHODS if m in methods)  # outputs in the contract order
        model.eval().requires_grad_(False)
        self.normalize = Normalize(mean, std)
        avgpool = getattr(model, "avgpool", None) or nn.Identity()  # LeNet-5 has none
        self.layers = nn.ModuleList([*model.features, avgpool, nn.Flatten(), *model.classifier])
        for layer in self.layers:
            if not isinstance(layer, _SUPPORTED):
                raise TypeError(f"SaliencyGraph cannot differentiate {type(layer).__name__}")
            if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or isinstance(layer.padding, str)):
                raise TypeError(f"SaliencyGraph supports only groups=1, numeric padding convs: {layer}")

        # Grad-CAM layer: the last activation after the last conv (features come first in layers).
        feats = list(model.features)
        last_conv = max((i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)), default=-1)
        acts = [i for i, m in enumerate(feats) if i > last_conv and isinstance(m, (nn.ReLU, nn.Tanh))]
        if last_conv < 0 or not acts:
            raise ValueError("SaliencyGraph needs a Conv2d followed by a ReLU/Tanh in model.features")
        self.cam_index = acts[-1]

        # One probe pass fixes every shape; only the batch dimension stays dynamic in the graph.
        first = next(m for m in feats if isinstance(m, nn.Conv2d))
        x = torch.zeros(1, first.in_channels, image_size, image_size, dtype=first.weight.dtype)
        self.output_padding: dict[int, tuple[int, int]] = {}
        self.pool_size: dict[int, tuple[int, int]] = {}  # (Ho, Wo) of each adaptive pool
        self.tiling_pools: set[int] = set()  # max pools whose windows tile the input (no overlap)
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if isinstance(layer, nn.Conv2d):
                self.output_padding[i] = _conv_output_padding(layer, x.shape[-2:], y.shape[-2:])
            elif isinstance(layer, nn.MaxPool2d) and _tiles(layer, x.shape[-2:]):
                self.tiling_pools.add(i)
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                # Pool each one-hot image: P (Ho*Wo, H*W), row o = the weights of output pixel o.
                h, w = x.shape[-2:]
                basis = torch.eye(h * w, dtype=x.dtype).view(h * w, 1, h, w)
                self.register_buffer(f"pool{i}", layer(basis).flatten(1).T)
                self.pool_size[i] = (y.shape[-2], y.shape[-1])
            x = y
        self.image_size = image_size
        self.train(False)

    def train(self, mode: bool = True) -> SaliencyGraph:
        return super().train(False)  # an export graph is always in inference mode

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits and saliency maps for the ``target`` class (−1 = the predicted class).

        Args:
            image: uint8 (N, C, H, W) at ``image_size``.
            target: int64 (N,) class index per image, −1 for the argmax of the logits. An index
                outside [0, K) gives all-zero maps.

        Returns:
            logits (N, K); gradient and guided (N, C, H, W), d logit / d (image / 255);
            gradcam (N, H, W) in [0, 1].
        """
        outs, indices = self._forward(self.normalize(image))
        logits = outs[-1]  # (N, K)
        target = torch.where(target < 0, logits.argmax(dim=1), target)
        # d(selected logit)/d(logits) = one-hot row; arange == target exports everywhere.
        seed = (torch.arange(logits.shape[1], device=logits.device) == target[:, None]).to(logits.dtype)

        grads, cam_grad = self._backward(seed, outs, indices)
        maps = {}
        # Chain through (x - mean) / std: d/dx = g / std, so the maps are w.r.t. the 0–1 image.
        for method in ("gradient", "guided"):
            if method in self.methods:
                maps[method] = grads[method] / self.normalize.std
        if "gradcam" in self.methods:
            act = outs[self.cam_index + 1]  # (N, C', h, w) output of the Grad-CAM layer
            weights = cam_grad.mean(dim=(2, 3), keepdim=True)  # (N, C', 1, 1)
            cam = (weights * act).sum(dim=1, keepdim=True).relu()  # (N, 1, h, w)
            cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            maps["gradcam"] = cam / _nonzero(cam.amax(dim=(1, 2), keepdim=True))
        return (logits, *(maps[m] for m in self.methods))

    def _forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[int, torch.Tensor]]:
        """Run the layers, keeping what backward needs: outs[i] is the input of layer i
        (outs[-1] the logits) and indices[i] the argmax positions of max-pool layer i."""
        outs, indices = [x], {}
        for i, layer in enumerate(self.layers):
            if i in self.tiling_pools:
                x = F.max_pool2d(x, layer.kernel_size, layer.stride)  # backward needs no indices
            elif isinstance(layer, nn.MaxPool2d):
                x, indices[i] = F.max_pool2d(
                    x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                    ceil_mode=layer.ceil_mode, return_indices=True,
                )
            elif isinstance(layer, nn.AdaptiveAvgPool2d):
                pool = getattr(self, f"pool{i}")  # (Ho*Wo, H*W)
                x = (x.flatten(2) @ pool.T).unflatten(2, self.pool_size[i])
            else:
                x = layer(x)
            outs.append(x)
        return outs, indices

    def _backward(
        self, seed: torch.Tensor, outs: list[torch.Tensor], indices: dict[int, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Propagate ``seed`` (gradient w.r.t. the logits, (N, K)) down the layers, once for all
        methods: the plain pass (gradient, Grad-CAM) and the guided pass are stacked along the
        batch, rows [plain; guided], so every weight and activation mask is read once for both
        (VGG16's first Linear alone is 400 MB). Grad-CAM needs the plain pass only down to its
        layer; below it, a plain pass that only serves Grad-CAM is dropped.

        Returns:
            {"gradient": ..., "guided": ...} input gradients (N, C, H, W), each only if its
            method is wanted, and the plain gradient at the Grad-CAM layer's output (or None).
        """
        passes = [p for p, wanted in (("gradient", {"gradient", "gradcam"}), ("guided", {"guided"}))
                  if wanted & set(self.methods)]  # stacking order; "gradient" = the plain pass
        g = seed if len(passes) == 1 else torch.cat([seed] * len(passes))
        cam_grad = None
        # Guided rule at every activation: max(g, floor), floor -inf for plain rows, 0 for guided.
        floor = torch.tensor([0.0 if p == "guided" else -torch.inf for p in passes], dtype=seed.dtype,
                             device=seed.device)
        for i in reversed(range(len(self.layers))):
            if i == self.cam_index and "gradcam" in self.methods:
                cam_grad = g if len(passes) == 1 else g.unflatten(0, (len(passes), -1))[0]
                if "gradient" not in self.methods:  # the plain pass is done
                    if passes == ["gradient"]:
                        return {}, cam_grad
                    g, passes, floor = g.unflatten(0, (2, -1))[1], ["guided"], floor[1:]
            g = self._layer_input_grad(i, g, passes, floor, outs, indices)
        grads = g.unflatten(0, (len(passes), -1))
        return {p: grads[k] for k, p in enumerate(passes)}, cam_grad

    def _layer_input_grad(self, i: int, g: torch.Tensor, passes: list[str], floor: torch.Tensor,
                          outs: list[torch.Tensor], indices: dict[int, torch.Tensor]) -> torch.Tensor:
        """Layer ``i``'s rule (the table in the module docstring): the gradient w.r.t. its input,
        given ``g`` w.r.t. its output, for the stacked ``passes``."""
        layer, x, y = self.layers[i], outs[i], outs[i + 1]
        if isinstance(layer, nn.Linear):
            g = g @ layer.weight
        elif isinstance(layer, (nn.ReLU, nn.Tanh)):
            slope = (y > 0).to(y.dtype) if isinstance(layer, nn.ReLU) else 1 - y * y
            if passes == ["gradient"]:
                g = g * slope
            elif passes == ["guided"]:
                g = (g * slope).clamp(min=0)
            else:
                rows = g.unflatten(0, (2, -1))  # (2, N, ...): the slope broadcasts over passes
                g = torch.maximum(rows * slope, floor.view(2, *[1] * y.dim())).flatten(0, 1)
        elif isinstance(layer, nn.Conv2d):
            g = _conv_input_grad(g, layer, self.output_padding[i])
        elif i in self.tiling_pools:
            g = _unpool_tiles(g, x, y, _pair(layer.kernel_size), len(passes))
        elif isinstance(layer, nn.MaxPool2d):
            # Each output's gradient goes to the input pixel it came from (per-plane index).
            index = indices[i].flatten(2).repeat(len(passes), 1, 1)  # (P*N, C, ho*wo)
            zeros = torch.zeros_like(x).flatten(2).repeat(len(passes), 1, 1)  # (P*N, C, H*W)
            g = zeros.scatter_add(2, index, g.flatten(2)).reshape(-1, *x.shape[1:])
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            g = (g.flatten(2) @ getattr(self, f"pool{i}")).reshape(-1, *x.shape[1:])
        elif isinstance(layer, nn.BatchNorm2d):
            scale = torch.rsqrt(layer.running_var + layer.eps)  # eval: y = (x - mean) * scale * w + b
            if layer.weight is not None:
                scale = scale * layer.weight
            g = g * scale.view(1, -1, 1, 1)
        elif isinstance(layer, nn.Flatten):
            g = g.reshape(-1, *x.shape[1:])
        # Dropout (eval) and Identity pass g through unchanged.
        return g


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with its zeros replaced by 1: a divisor that leaves an all-zero map zero.

    Grad-CAM is all zero wherever no location weighs positively (a dead or saturated layer, a
    uniform image, an out-of-range target). The textbook ``cam / (max + eps)`` does not survive
    export: the onnxscript optimizer's no-op rule ``x + 0 → x`` matches constants within
    ``abs_tol=1e-8`` of zero, drops ``+ 1e-8`` and leaves 0/0 = NaN in ``saliency.onnx``. A
    ``Where`` on the data is never folded, and any positive maximum, however small, still maps
    to exactly 1.
    """
    return torch.where(scale > 0, scale, 1)


def _tiles(pool: nn.MaxPool2d, size_in: Sequence[int]) -> bool:
    """Whether ``pool``'s windows tile its input: kernel == stride, no padding or dilation, and
    (ceil mode only) no partial window at the border. Floor mode may drop a border strip."""
    k, s, p, d = (_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation))
    return (k == s and p == (0, 0) and d == (1, 1)
            and not (pool.ceil_mode and any(n % kk for n, kk in zip(size_in, k, strict=True))))


def _unpool_tiles(
    g: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kernel: tuple[int, int], passes: int = 1
) -> torch.Tensor:
    """Max-pool backward for windows that tile ``x``: each window's gradient goes to its first
    maximum (row-major), as autograd does.

    Built from nearest upsampling (ONNX Resize), a plain MaxPool and elementwise ops on full
    (N, C, H, W) tensors: in ONNX Runtime that is ~15× faster than MaxPool with indices followed
    by ScatterElements, and than broadcasting over a 6-D window view.

    Args:
        g: gradient w.r.t. the pool output (passes*N, C, ho, wo), the passes stacked.
        x: pool input (N, C, H, W); y: pool output (N, C, ho, wo).
        kernel: (kh, kw) = stride.
        passes: how many backward passes ``g`` stacks; the mask is computed once for all.
    """
    (kh, kw), (ho, wo), (h, w) = kernel, y.shape[-2:], x.shape[-2:]
    cropped = (h, w) != (ho * kh, wo * kw)
    if cropped:
        x = x[..., : ho * kh, : wo * kw]  # floor mode: the border strip gets no gradient

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=(kh, kw), mode="nearest")

    # Ties are common (flat image regions, saturated tanh): score each hit by its position in
    # the window, kh*kw for the first down to 1 for the last, and keep the best-scored one.
    rank = torch.arange(kh * kw, 0, -1, dtype=x.dtype, device=x.device).view(kh, kw).repeat(ho, wo)
    score = (x == up(y)) * rank
    first = score == up(F.max_pool2d(score, (kh, kw)))
    g = up(g) if passes == 1 else up(g).unflatten(0, (passes, -1))  # (passes, N, C, H, W)
    g = torch.where(first, g, 0).reshape(-1, *first.shape[1:])
    return F.pad(g, (0, w - wo * kw, 0, h - ho * kh)) if cropped else g


def _conv_input_grad(g: torch.Tensor, conv: nn.Conv2d, output_padding: tuple[int, int]) -> torch.Tensor:
    """Gradient w.r.t. the input of ``conv`` (groups=1) given ``g`` w.r.t. its output.

    A stride-1 conv's transpose is itself a conv: the kernel flipped in space, in/out channels
    swapped, padding d(k-1) - p. ONNX Runtime runs that Conv on its blocked (NCHWc) kernels,
    ConvTranspose on a generic one: measured on 2 cores, Conv is 1.3–4× faster for VGG16's
    64–512 channels, but 2–4× slower where the gradient has few channels (LeNet-5's 1 and 6,
    VGG16's 3 input channels), which fill no 8-wide block. Hence the channel condition.
    """
    pad = [d * (k - 1) - p for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation, strict=True)]
    if conv.stride == (1, 1) and min(pad) >= 0 and conv.in_channels % 8 == 0:
        return F.conv2d(g, conv.weight.transpose(0, 1).flip(2, 3), None, 1, pad, conv.dilation)
    return F.conv_transpose2d(g, conv.weight, None, conv.stride, conv.padding, output_padding, 1, conv.dilation)


def _conv_output_padding(conv: nn.Conv2d, size_in: Sequence[int], size_out: Sequence[int]) -> tuple[int, int]:
    """The ``output_padding`` that makes ``conv_transpose2d`` return exactly ``size_in``: a strided
    conv maps several input sizes to one output size, the transpose must pick the right one."""
    return tuple(  # type: ignore[return-value]
        h - ((ho - 1) * s - 2 * p + d * (k - 1) + 1)
        for h, ho, s, p, d, k in zip(
            size_in, size_out, conv.stride, conv.padding, conv.dilation, conv.kernel_size, strict=True
        )
    )
