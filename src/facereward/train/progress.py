"""ProgressLog: a trainer's progress bar plus scalar logging to TensorBoard every `log_every` steps (main process only)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


class ProgressLog:
    """A progress bar plus scalar logging to TensorBoard every `log_every` steps (main process only)."""

    def __init__(self, accelerator: Accelerator, total: int, initial: int, desc: str, log_every: int, enabled: bool = True,
                 history: list[dict[str, float]] | None = None):
        self.accelerator = accelerator
        self.log_every = max(1, log_every)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and accelerator.is_main_process), dynamic_ncols=True)
        self.plain = not enabled and accelerator.is_main_process  # no bar: print a line per log step instead
        self.desc, self.total = desc, total
        self.history: list[dict[str, float]] = list(history or [])  # a resumed run continues the saved log

    def step(self, step: int, scalars: dict[str, torch.Tensor | float]) -> None:
        """Advance one step; every `log_every` steps sync the scalars to the host and log them."""
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            values = {k: float(v.detach().float().mean()) if torch.is_tensor(v) else float(v) for k, v in scalars.items()}
            self.accelerator.log(values, step=step)
            self.history.append({"step": step, **values})
            shown = {k: f"{v:.4g}" for k, v in values.items() if "/" not in k or k.endswith("loss")}
            self.bar.set_postfix(shown)
            if self.plain:
                print(f"{self.desc} step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)

    def close(self) -> None:
        self.bar.close()
