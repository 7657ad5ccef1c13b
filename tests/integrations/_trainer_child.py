"""The process side of the kill-and-resume test in ``tests/integrations/test_transformers_trainer.py``.

    python tests/integrations/_trainer_child.py DIR

In one interpreter (one thread, so every run computes alike): an uninterrupted ``PeftkitTrainer`` run in
``DIR/full``; a forked run in ``DIR/killed`` that SIGKILLs itself at the end of step 4, after writing
``checkpoint-3``; then, in this process, a new model (another adapter init) and a new trainer resuming
``DIR/killed``. Writes both runs' final adapters (``full.safetensors``, ``resumed.safetensors``) and
``DIR/results.json``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import peftkit  # noqa: E402
from peftkit.integrations.transformers_trainer import PeftkitTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support
from support.trainer import Records, arguments, tiny_bert


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)


def main(root: Path) -> None:
    torch.set_num_threads(1)
    full = tiny_bert()
    PeftkitTrainer(model=full, args=arguments(root / "full"), train_dataset=Records()).train()
    save_file(dict(peftkit.adapter_state_dict(full)), root / "full.safetensors")

    pid = os.fork()
    if pid == 0:
        try:
            PeftkitTrainer(
                model=tiny_bert(),
                args=arguments(root / "killed"),
                train_dataset=Records(),
                callbacks=[Kill()],
            ).train()
        finally:
            os._exit(3)  # reached only if the kill did not happen
    _, status = os.waitpid(pid, 0)
    left = sorted(p.name for p in (root / "killed").iterdir())

    resumed = tiny_bert(seed=7)
    parameters = {id(p) for p in resumed.parameters() if p.requires_grad}
    trainer = PeftkitTrainer(model=resumed, args=arguments(root / "killed"), train_dataset=Records())
    trainer.train(resume_from_checkpoint=True)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    save_file(dict(peftkit.adapter_state_dict(resumed)), root / "resumed.safetensors")
    (root / "results.json").write_text(
        json.dumps(
            {
                "killed_by": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "left": left,
                "global_step": trainer.state.global_step,
                "optimizer_holds_the_model_parameters": optimized == parameters,
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
