"""Writing a torch graph to one self-contained ``.onnx`` file (dynamo exporter, dynamic batch)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pipeline.common.files import write_atomic


def export_onnx(
    module: nn.Module,
    path: str | Path,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    metadata: dict[str, str],
    opset: int = 18,
) -> None:
    """Export ``module`` to one self-contained ONNX file, batch dimension dynamic.

    The file is written next to ``path`` under a temporary name, checked with
    ``onnx.checker`` and then renamed over ``path``, so readers never see half a model.

    Args:
        module: the graph to export (e.g. ``ClassifierGraph``, ``SaliencyGraph``).
        path: destination ``.onnx`` file.
        example_inputs: one example per input; use a batch of at least 2 so the exporter
            cannot specialise the batch dimension to 1.
        input_names: ONNX names of the inputs, in order.
        output_names: ONNX names of the outputs, in order.
        metadata: string key/values stored as the model's ``metadata_props``.
        opset: ONNX opset version (>= 17).
    """
    import onnx  # only the export stage needs it

    with warnings.catch_warnings():
        # Every input names its axis 0 "batch"; the exporter warns that it merges equal names.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
        program = torch.onnx.export(
            module.eval(),
            example_inputs,
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=tuple({0: "batch"} for _ in example_inputs),
            verbose=False,
        )
    proto = program.model_proto  # weights included: we write the file ourselves, in one piece
    onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    onnx.checker.check_model(proto)
    write_atomic(path, lambda tmp: onnx.save(proto, tmp, save_as_external_data=False))
