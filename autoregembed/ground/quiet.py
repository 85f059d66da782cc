"""Other libraries' console output that tells our users nothing, turned off once per process.

Why: half of the default job's console was other libraries' lines (a "Loading weights" bar per model
load, transformers' load report calling the unused ``lm_head.weight`` UNEXPECTED, its mean-resizing
notice, DeepSpeed's accelerator guess, torch's deprecation warnings for calls DeepSpeed makes), each
printed by every rank. What a run does is said by ``monitor.log``; other libraries keep their warnings
(but two, ``_not_noise``) and errors.
"""
from __future__ import annotations

import logging
import os
import warnings

_done = False


def quiet_libraries():
    """Idempotent; call before transformers, huggingface_hub or DeepSpeed print anything."""
    global _done
    if _done:
        return
    _done = True
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"  # said, not guessed: DeepSpeed then has no warning to give
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.get_logger()  # configures the library's handler, which the filter goes on
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(_not_noise)
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _not_noise(record: logging.LogRecord) -> bool:
    """transformers' warnings stay, but for two that every run gives: a load report that finds only
    unexpected weights (the LM head that an encoder-only load leaves out), and the notice that new
    embedding rows start at the vocabulary's mean.  A report of missing or mismatched weights stays:
    those start random, and a run must not train on them unannounced."""
    text = record.getMessage()
    if "LOAD REPORT" in text:
        return "MISSING" in text or "MISMATCH" in text
    return "mean_resizing=False" not in text
