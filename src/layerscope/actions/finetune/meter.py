"""What a training run costs, measured while it runs: loss curve, step time, optimizer-state bytes, peak memory.

Peak memory is the process's resident set size (RSS) sampled every 20 ms from /proc during training on a CPU
(`torch.cuda.max_memory_allocated` on a GPU). Optimizer-state bytes are every tensor in ``optimizer.state``
(`layers.optimizer_state_bytes`), taken after each optimizer step (its peak is reported).
"""
from __future__ import annotations

import os
import threading
import time

import torch
from transformers import TrainerCallback

from layerscope.actions.finetune.layers import optimizer_state_bytes, trainable_bytes


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class CostMeter(TrainerCallback):
    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.losses: list[dict] = []
        self.step_times: list[float] = []
        self.state_bytes: list[int] = []
        self.trainable: list[int] = []
        self.peak_rss: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t = 0.0
        self.cuda = False

    def _sample(self):
        while not self._stop.is_set():
            r = rss_bytes()
            if r is not None:
                self.peak_rss = max(self.peak_rss or 0, r)
            self._stop.wait(self.interval_s)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.cuda = next(model.parameters()).is_cuda
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif rss_bytes() is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._t = time.perf_counter()
        self.trainable.append(trainable_bytes(model))

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.step_times.append(time.perf_counter() - self._t)
        self.state_bytes.append(optimizer_state_bytes(optimizer))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append({"step": int(state.global_step), "loss": float(logs["loss"])})

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def summary(self) -> dict:
        times = self.step_times[1:] or self.step_times  # the first step includes warm-up
        peak = torch.cuda.max_memory_allocated() if self.cuda else self.peak_rss
        return {"loss_curve": self.losses,
                "step_time_s": sum(times) / len(times) if times else None,
                "step_times_s": [round(t, 4) for t in self.step_times],
                "optimizer_state_bytes": max(self.state_bytes) if self.state_bytes else None,
                "optimizer_state_bytes_per_step": self.state_bytes,
                "trainable_bytes_max": max(self.trainable) if self.trainable else None,
                "peak_memory_bytes": peak,
                "peak_memory_kind": "cuda max_memory_allocated" if self.cuda else "process RSS during training (sampled 20 ms)"}
