"""Lightning training that survives a kill: a checkpoint every epoch, resumed by the next run.

Controller and gate training both run through :func:`fit_resumable`. The checkpoint folder lives in
the artifact's work folder (``<cache>/<kind>/<key>.partial/checkpoints``), so running the same command
again after a crash finds it; the finished artifact is the safetensors file and the folder is removed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from uzr.cache import load_torch_weights

log = logging.getLogger(__name__)


def usable_checkpoint(folder: Path, what: str) -> Path | None:
    """``folder/last.ckpt`` if it loads (as plain tensors); a checkpoint cut short by the crash is
    removed with a warning so that it cannot block every later run."""
    last = folder / "last.ckpt"
    if not last.exists():
        return None
    try:
        load_torch_weights(last)
    except Exception as err:
        log.warning("ignoring unreadable %s (%s); %s training starts over", last, err, what)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    log.info("%s training resumes from %s", what, last)
    return last


def fit_resumable(module: L.LightningModule, checkpoints: Path, what: str, trainer_kwargs: dict,
                  **fit_kwargs) -> bool:
    """``Trainer(**trainer_kwargs).fit(module, **fit_kwargs)`` with a ``last.ckpt`` in ``checkpoints``
    after every epoch, resuming from it when present. Returns whether it resumed. The caller removes
    ``checkpoints`` once the trained weights are saved."""
    last = usable_checkpoint(checkpoints, what)
    callback = ModelCheckpoint(dirpath=checkpoints, save_last=True, save_top_k=1, every_n_epochs=1)
    trainer = L.Trainer(callbacks=[callback], **trainer_kwargs)
    # weights_only: a checkpoint is data, never code (its hyperparameters are plain types)
    trainer.fit(module, ckpt_path=str(last) if last else None, weights_only=True, **fit_kwargs)
    return last is not None
