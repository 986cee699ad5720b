"""``model.pt``: the best weights of a training run and their :class:`~pipeline.common.contract.ModelCard`.

The card is the only source for rebuilding the model (architecture, classes, input) and for
describing it later (export writes it into the ONNX files and the registry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import build_model
from pipeline.common.contract import ModelCard
from pipeline.common.errors import UserError
from pipeline.common.files import write_atomic
from pipeline.common.metrics import BestEpoch


def save_trained(path: str | Path, state_dict: dict[str, torch.Tensor], card: ModelCard, best: BestEpoch,
                 params: dict[str, Any]) -> None:
    """Weights, the card, the epoch they are from and the run's params (``Params.flat()``), all as
    plain data so that ``weights_only`` loading works."""
    obj = {"model": state_dict, "card": card.model_dump(), "best": best.plain(), "params": params}
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_trained(path: str | Path) -> tuple[nn.Module, ModelCard]:
    """The model in eval mode with the best weights, and its card."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no trained model; run the train stage first (dvc repro train)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if "card" not in saved:
        raise UserError(f"{path}: written by an older version of the train stage; train again (dvc repro train)")
    card = ModelCard.model_validate(saved["card"])
    model = build_model(card.architecture, len(card.classes), card.channels, card.image_size)
    model.load_state_dict(saved["model"])
    return model.eval(), card
