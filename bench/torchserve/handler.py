"""TorchServe handler for the comparison in bench/torchserve_compare.py: the trained ``model.pt``
(the weights our ONNX export was made from) in eager PyTorch, batched, top-k as JSON.

Runs inside TorchServe's Python worker (``.venv-torchserve``), not in the project's venv. The
archive carries two copies from this repository beside it (bench/torchserve_compare.py stages
them): the ``models`` package (the network constructors) and ``pipeline/common/images.py`` as
``project_images.py``, so the pixels are those our service computes (decode, EXIF orientation,
channels, centre crop, resize) and normalisation is :class:`models.graphs.Normalize`, the one in
our exported graph.

Request: the image as a multipart field (any name; the benchmark sends ``data``) or as the raw
body. Answer per image: ``{"predictions": [{"index", "label", "probability"}, ...]}``, top 5 (at
most the class count), or ``{"error": "..."}`` for an image that cannot be read.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from ts.torch_handler.base_handler import BaseHandler

TOP_K = 5


class LeNetHandler(BaseHandler):
    """Loads ``model.pt`` (weights + model card) and answers a batch of images in one forward pass."""

    def initialize(self, context) -> None:
        # One intra-op thread per worker (the benchmark's configuration: 2 workers x 1 thread).
        torch.set_num_threads(int(os.environ.get("TS_BENCH_TORCH_THREADS", "1")))
        # Imported here: TorchServe puts the archive's folder on sys.path before initialize.
        import project_images

        from models import build_model
        from models.graphs import Normalize

        model_dir = context.system_properties["model_dir"]
        saved = torch.load(os.path.join(model_dir, context.manifest["model"]["serializedFile"]),
                           map_location="cpu", weights_only=True)
        card = saved["card"]
        network = build_model(card["architecture"], len(card["classes"]), card["channels"], card["image_size"])
        network.load_state_dict(saved["model"])
        self.model = torch.nn.Sequential(Normalize(card["mean"], card["std"]), network.eval()).eval()
        self.classes = list(card["classes"])
        self.image_size, self.channels = int(card["image_size"]), int(card["channels"])
        self.preprocess_image = project_images.preprocess
        self.image_error = project_images.ImageError
        self.device = torch.device("cpu")
        self.initialized = True

    def preprocess(self, data: list[dict]) -> tuple[torch.Tensor | None, list[str | None]]:
        """uint8 (N, C, H, W) of the readable images, and per request None or its error message."""
        arrays, errors = [], []
        for request in data:
            blob = request.get("data") or request.get("body") or next(iter(request.values()), None)
            try:
                if not isinstance(blob, (bytes, bytearray)):
                    raise self.image_error("not_an_image", "no image in the request")
                arrays.append(self.preprocess_image(bytes(blob), self.image_size, self.channels))
                errors.append(None)
            except self.image_error as err:
                errors.append(str(err))
        batch = torch.from_numpy(np.stack(arrays)) if arrays else None
        return batch, errors

    def inference(self, data: tuple[torch.Tensor | None, list[str | None]], *args, **kwargs):
        batch, errors = data
        if batch is None:
            return None, errors
        with torch.inference_mode():
            return torch.softmax(self.model(batch), dim=1), errors

    def postprocess(self, data) -> list[dict]:
        probabilities, errors = data
        k = min(TOP_K, len(self.classes))
        top = torch.topk(probabilities, k, dim=1) if probabilities is not None else None
        answers, row = [], 0
        for error in errors:
            if error is not None:
                answers.append({"error": error})
                continue
            values, indices = top.values[row].tolist(), top.indices[row].tolist()
            answers.append({"predictions": [{"index": i, "label": self.classes[i], "probability": p}
                                            for i, p in zip(indices, values, strict=True)]})
            row += 1
        return answers
