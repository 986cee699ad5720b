"""The resumable training state (``artifacts/checkpoint/last.pt``), typed.

The train stage rewrites it atomically after every epoch; a run killed mid-way resumes from it
and ends with the same metrics as an uninterrupted one. Its :attr:`Checkpoint.fingerprint`
names what it was trained on (params, data, code, MLflow store): a checkpoint of anything else
is ignored. Stored as plain containers and tensors, so ``torch.load(weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.common.files import write_atomic
from pipeline.common.metrics import BestEpoch, EpochRecord

log = logging.getLogger(__name__)


def fingerprint(*parts: str) -> str:
    """A short digest of everything a checkpoint depends on."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class Checkpoint(BaseModel):
    """Everything an epoch boundary needs to continue bit for bit."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    fingerprint: str
    epoch: int  # the last finished epoch
    mlflow_run_id: str  # the run the next epochs log into
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_cpu: torch.Tensor  # torch's global CPU generator (dropout draws from it)
    history: list[EpochRecord]
    best: BestEpoch
    best_state: dict[str, torch.Tensor]  # the weights of the best epoch

    def save(self, path: str | Path) -> None:
        """torch.save to a temporary name, then rename: a kill never leaves half a file."""
        state = {name: getattr(self, name) for name in type(self).model_fields}
        state |= {"history": [row.model_dump() for row in self.history], "best": self.best.model_dump()}
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: str | Path, expected_fingerprint: str, device: torch.device) -> Checkpoint | None:
        """The checkpoint at ``path`` if there is one for this very run (its fingerprint), else None."""
        path = Path(path)
        if not path.exists():
            return None
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
            log.info("ignoring %s: it was trained with other params, data or code, or for another MLflow store", path)
            return None
        try:
            return cls.model_validate(state)
        except ValidationError as err:
            log.info("ignoring %s: not a checkpoint of this version (%s)", path, err.errors()[0]["loc"])
            return None
