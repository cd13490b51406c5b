"""The epoch bookkeeping the online trainers (LRPO, NFT, DPO) share: the training clock, held-out evaluation with the
reward-hacking alarm, the logged history and OUTPUT/metrics.json, checkpoint cadence, and the final save.

A trainer computes an epoch's scalars; `EpochRecorder.end_epoch` does the rest and says whether to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn

from facereward.models.restorer import Restorer
from facereward.train.accelerator import RunConfig, full_network
from facereward.train.checkpoints import checkpoint_run
from facereward.train.heldout import HeldOutConfig, HeldOutEvaluator, HeldOutMonitor, write_metrics
from facereward.train.progress import ProgressLog
from facereward.train.trainable import save_restorer

class EpochRecorder:
    """One run's epochs: where a resume starts, the history of logged scalars and the held-out monitor.

    `net` is the trained network as `accelerator.prepare` returned it and `module` the unwrapped one; a checkpoint
    holds `modules` and `optimizers` (by name, `net` among them) and the recorder's state plus `extra_state()`.
    """

    def __init__(self, trainer: str, epochs: int, run: RunConfig, held_out: HeldOutConfig,
                 evaluator: HeldOutEvaluator | None, accelerator: Accelerator, state: dict[str, Any] | None,
                 net: nn.Module, module: nn.Module, modules: dict[str, nn.Module],
                 optimizers: dict[str, Any], extra_state: Callable[[], dict[str, Any]] | None = None):
        self.trainer, self.epochs, self.run, self.accelerator = trainer, epochs, run, accelerator
        self.net, self.module, self.modules, self.optimizers = net, module, modules, optimizers
        self.extra_state = extra_state or dict
        self.start = int(state["step"]) if state else 0
        self.history: list[dict[str, Any]] = list(state.get("history", [])) if state else []
        self.monitor = HeldOutMonitor(held_out, evaluator, accelerator, trainer, "epoch", epochs, (state or {}).get("held_out"))
        self.log = ProgressLog(accelerator, epochs, self.start, trainer, run.log_every, run.progress)
        self.metrics_path = Path(run.output_dir) / "metrics.json"
        # reward per compute (docs/methods.md 2.4): the run's training wall-clock, held-out evaluation left out
        self.trained_s = self.history[-1].get("time/train_s", 0.0) if self.history else 0.0

    def network(self) -> nn.Module | None:
        """The trained network with all its weights (`full_network`); call it on every process."""
        return full_network(self.accelerator, self.net, self.module)

    def baseline(self, restorer: Restorer) -> None:
        """On a fresh run with held-out evaluation: epoch 0, the base, the baseline of every curve."""
        if self.start == 0 and not self.monitor.records and self.monitor.config.every > 0:
            self.monitor.evaluate(0, restorer, self.network())
            if self.monitor.last:
                self.history.append({"epoch": 0, **{f"held_out/{k}": v for k, v in self.monitor.last.items()}})

    def end_epoch(self, epoch: int, scalars: dict[str, float], epoch_s: float, train_reward: float, restorer: Restorer) -> bool:
        """Close epoch `epoch` (1-based) that trained for `epoch_s` seconds: clock, held-out when due, log, metrics file,
        and a checkpoint when due; returns True (on every process) when the hacking alarm stops the run."""
        self.trained_s += epoch_s
        scalars.update({"time/epoch_s": epoch_s, "time/train_s": self.trained_s})
        self.monitor.add_reward(train_reward)
        stop = False
        if self.monitor.due(epoch):
            stop = self.monitor.evaluate(epoch, restorer, self.network())
            scalars.update({f"held_out/{k}": v for k, v in self.monitor.last.items()})
        self.history.append({"epoch": epoch, **scalars})
        self.log.step(epoch, scalars)
        if self.accelerator.is_main_process:
            write_metrics(self.metrics_path, "epoch", self.monitor.records, self.history)
        if stop or epoch % self.run.save_every == 0 or epoch == self.epochs:
            checkpoint_run(self.accelerator, self.run, epoch, self.modules, self.optimizers,
                           {"history": self.history, "held_out": self.monitor.state(), **self.extra_state()})
        if stop:
            self.accelerator.print(f"{self.trainer}: stopped after epoch {epoch} on the reward-hacking alarm "
                                   "(held_out.stop_on_hacking)")
        return stop

    def finish(self, restorer: Restorer) -> Path:
        """Save OUTPUT/model (a plain restorer folder, LoRA merged) and the final metrics; returns the model folder."""
        self.log.close()
        out = Path(self.run.output_dir) / "model"
        self.accelerator.wait_for_everyone()
        full = self.network()
        if self.accelerator.is_main_process:
            save_restorer(restorer, out, net=full)
            write_metrics(self.metrics_path, "epoch", self.monitor.records, self.history)
        self.accelerator.end_training()
        return out
