"""What a training run shows while it works: one bar for the language model's buffer fills (tokens and tokens/s)
and one for the training steps, whose rate and ETA count training only.

A fill of the activation buffer can take minutes (on a CPU, the demo's first fill takes as long as a few hundred
steps). Counted as part of a step, it would make the first step look like the run's pace and put the ETA at days;
so the time the loop waits for the store is taken off the step bar's clock, and the fill's own bar shows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm


class Progress:
    """The two bars of a run (both silent when `enabled` is False). `store.progress`, when the store has that
    attribute, is pointed at the fill bar, so the store reports the tokens each forward pass adds."""

    def __init__(self, store, total_steps: int, first_step: int, name: str, enabled: bool):
        self.enabled = enabled
        self.steps = tqdm(total=total_steps, initial=first_step, unit="step", disable=not enabled,
                          dynamic_ncols=True, desc=name, position=0)
        self.fills = tqdm(unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True,
                          desc="language model", position=1, leave=False)
        self.store = store
        if enabled and hasattr(store, "progress"):
            store.progress = self.fills.update
        self.waited = 0.0  # seconds spent waiting for batches, kept off the step clock

    def wait_for(self, next_batch: Callable):
        """`next_batch()`, with the wait kept off the step bar's rate and ETA."""
        start = time.perf_counter()
        batch = next_batch()
        waited = time.perf_counter() - start
        self.waited += waited
        if self.enabled:  # tqdm's own clock: elapsed time, rate and ETA all read it
            self.steps.start_t += waited
            self.steps.last_print_t += waited
        return batch

    def step(self, **postfix) -> None:
        if postfix:
            self.steps.set_postfix(**postfix, refresh=False)
        self.steps.update(1)

    def close(self) -> None:
        if self.enabled and hasattr(self.store, "progress"):
            self.store.progress = None
        self.fills.close()
        self.steps.close()
