"""The step bar's rate and ETA count training only: time spent waiting for the activation store (a buffer fill)
is kept off its clock."""

import time

from mtc.progress import Progress


class SlowStore:
    """Every batch takes `wait` seconds to arrive, as a buffer fill would."""

    def __init__(self, wait: float):
        self.wait, self.progress = wait, None

    def next_batch(self):
        time.sleep(self.wait)
        if self.progress is not None:
            self.progress(100)
        return object()


def test_waiting_for_batches_is_kept_off_the_step_clock():
    store = SlowStore(0.3)
    progress = Progress(store, total_steps=4, first_step=0, name="run", enabled=True)
    assert store.progress is not None  # the store reports its forward passes to the fill bar
    for _ in range(4):
        progress.wait_for(store.next_batch)
        progress.step()
    elapsed, tokens = progress.steps.format_dict["elapsed"], progress.fills.n
    progress.close()
    assert progress.waited >= 1.2
    assert elapsed < 0.3  # four near-instant steps: none of the 1.2 s of waiting is counted
    assert tokens == 400 and store.progress is None


def test_a_disabled_progress_still_counts_the_waiting():
    store = SlowStore(0.05)
    progress = Progress(store, total_steps=2, first_step=0, name="run", enabled=False)
    progress.wait_for(store.next_batch)
    progress.step(fvu="0.5")
    progress.close()
    assert progress.waited >= 0.05 and store.progress is None
