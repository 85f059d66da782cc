"""Stage-1 run used by test_crash.py: `crash_worker.py OUT BASE MAX_STEPS [CRASH_IN_SAVE_AT|-] [KEY=VALUE ...]`.

With CRASH_IN_SAVE_AT=N the process SIGKILLs itself right after DeepSpeed has written the
step-N checkpoint shards and before that checkpoint is committed (renamed, `latest`).
"""
import os
import signal
import sys
import warnings

warnings.filterwarnings("ignore")
from deepspeed.runtime.engine import DeepSpeedEngine  # noqa: E402

from autoregembed.ground import distributed as D  # noqa: E402
from autoregembed.run.config import load_config  # noqa: E402
from autoregembed.run.stages import stages_for  # noqa: E402
from autoregembed.run.session import RunContext  # noqa: E402
from autoregembed.run.trainer import train_stage  # noqa: E402

out, base, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
crash_at = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
overrides = sys.argv[5:]
if crash_at is not None:
    real_save = DeepSpeedEngine.save_checkpoint

    def save_then_die(self, save_dir, tag=None, **kw):
        result = real_save(self, save_dir, tag=tag, **kw)
        if tag == f"step{crash_at:08d}.partial":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    DeepSpeedEngine.save_checkpoint = save_then_die
cfg = load_config(None, [f"output_dir={out}", f"model.base={base}", f"stage1.max_steps={max_steps}",
                         "stage1.micro_batch_size=4", "stage1.save_every=2", "stage1.keep_last=3",
                         "stage1.warmup_steps=2", *overrides])
D.init_distributed()
os.makedirs(os.path.join(out, "pids"), exist_ok=True)  # how test_crash.py finds the rank to kill
with open(os.path.join(out, "pids", str(D.rank())), "w") as f:
    f.write(str(os.getpid()))
ds = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs", "zero3.json")
train_stage(RunContext.of(cfg, ds), stages_for(cfg)["stage1"], resume=True)
D.shutdown()
