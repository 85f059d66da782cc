"""Other libraries' console output that tells our users nothing, turned off once per process.

Why: half of the default job's console was other libraries' lines (a "Loading weights" bar per model
load, transformers' load report calling the unused ``lm_head.weight`` UNEXPECTED, its mean-resizing
notice, DeepSpeed's accelerator guess, torch's deprecation warnings for calls DeepSpeed makes), each
printed by every rank. What a run does is said by ``monitor.log``; other libraries keep their errors.
"""
from __future__ import annotations

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

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
