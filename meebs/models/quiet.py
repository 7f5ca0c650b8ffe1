"""Keep the machine-learning libraries' INFO chatter out of our output.

Every command calls `quiet_libraries()` before it imports diffusers, transformers,
accelerate or bitsandbytes: some of them log at import time.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """The libraries' INFO chatter hides our own output; their warnings stay visible."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers warns at import that torchvision is missing (we need none of its image
    # processors); bitsandbytes that an optional 4-bit kernel package is missing.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("diffusers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
