"""The generic training loop and its callbacks, without DeepSpeed: hook order, phases, stopping, and that a
loop resumed from the callbacks' checkpointed state logs what an uninterrupted one does."""

import pytest

from ds_kdqat.distill.phases import Phase
from ds_kdqat.distill.schedule import PhaseSpan
from ds_kdqat.training.loop import ordered_micro_batches, run_loop
from ds_kdqat.training.callbacks import Callback, Checkpoint, DevEvaluation, LogWindow, LoopState
from ds_kdqat.training.order import epoch_micro_batches

PHASES = [Phase(PhaseSpan("ti_output", 0, 2), None), Phase(PhaseSpan("kd", 2, 6), None)]


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, state):
        self.calls.append(("begin", state.micro, state.step))

    def on_micro_end(self, state):
        self.calls.append(("micro", state.micro, state.phase.name))

    def on_step_end(self, state):
        self.calls.append(("step", state.step, state.phase.name))

    def on_train_end(self, state):
        self.calls.append(("end", state.micro, state.step))


class FakeLog:
    def __init__(self):
        self.rows = []

    def write(self, step, phase, split, values):
        self.rows.append((step, phase, split, {k: v for k, v in values.items() if k != "seconds"}))


def step_fn(batch, phase):
    """Terms that depend on the batch and the phase."""
    return {"total": float(batch) + (0.5 if phase.name == "kd" else 0.0), "pred": float(batch) / 2}


def test_loop_calls_hooks_in_order_with_the_phase_of_each_step():
    recorder = Recorder()
    state = LoopState(micro=0, step=0, total_steps=3)
    run_loop(iter(range(100)), step_fn, PHASES, state, accumulation=2, callbacks=[recorder])
    assert recorder.calls == [
        ("begin", 0, 0),
        ("micro", 1, "ti_output"), ("micro", 2, "ti_output"), ("step", 1, "ti_output"),
        ("micro", 3, "ti_output"), ("micro", 4, "ti_output"), ("step", 2, "ti_output"),
        ("micro", 5, "kd"), ("micro", 6, "kd"), ("step", 3, "kd"),
        ("end", 6, 3)]
    assert state.terms == step_fn(5, PHASES[1]) and not state.stopping


def test_a_resumed_loop_starts_at_its_step_and_a_finished_one_runs_nothing():
    recorder = Recorder()
    state = LoopState(micro=4, step=2, total_steps=3)
    run_loop(iter(range(4, 100)), step_fn, PHASES, state, 2, [recorder])
    assert [c for c in recorder.calls if c[0] == "step"] == [("step", 3, "kd")]
    done = Recorder()
    run_loop(iter(()), step_fn, PHASES, LoopState(micro=6, step=3, total_steps=3), 2, [done])
    assert done.calls == [("begin", 6, 3), ("end", 6, 3)]


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        state.stopping = state.step == self.step


def test_stopping_ends_the_loop_after_that_steps_callbacks():
    recorder = Recorder()
    state = LoopState(micro=0, step=0, total_steps=6)
    run_loop(iter(range(100)), step_fn, PHASES, state, 1, [StopAt(2), recorder])
    assert state.stopping and state.step == 2 and recorder.calls[-2:] == [("step", 2, "ti_output"), ("end", 2, 2)]


def test_train_end_runs_when_the_step_fails():
    recorder = Recorder()

    def failing(batch, phase):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_loop(iter(range(10)), failing, PHASES, LoopState(0, 0, 6), 1, [recorder])
    assert recorder.calls == [("begin", 0, 0), ("end", 0, 0)]


def test_ordered_micro_batches_continue_across_epochs_and_resume_anywhere():
    expected = [ids for epoch in range(3) for ids in epoch_micro_batches(10, 3, 0, 1, 7, epoch)]
    assert len(expected) == 9  # 3 micro batches an epoch
    for start in (0, 2, 3, 5):
        got = ordered_micro_batches(10, 3, 0, 1, 7, start)
        assert [next(got) for _ in range(9 - start)] == expected[start:]


EVALUATIONS = [{"acc": 0.5}, {"acc": 0.7}, {"acc": 0.6}, {"acc": 0.9}]


def callbacks(log, best_calls, evaluations_done=0):
    window = LogWindow(log, "kdqat", every=2, world_size=1, learning_rate=lambda: 0.1)
    metrics = iter(EVALUATIONS[evaluations_done:])
    dev = DevEvaluation(lambda: next(metrics), log, "kdqat", every=3, primary="acc", on_best=best_calls.append)
    return window, dev


def test_log_window_and_dev_evaluation_rows_and_best():
    log, best = FakeLog(), []
    window, dev = callbacks(log, best)
    state = LoopState(0, 0, 5)
    run_loop(iter(range(100)), step_fn, PHASES, state, 2, [window, dev])
    train = [r for r in log.rows if r[2] == "train"]
    # steps 2, 4 and the last (5); each row is the mean over the window's micro batches
    assert [r[0] for r in train] == [2, 4, 5]
    assert train[0][3] == {"total": 1.5, "pred": 0.75, "lr": 0.1}  # batches 0..3, all TI-O
    assert train[2][3] == {"total": 9.0, "pred": 4.25, "lr": 0.1}  # batches 8, 9 under kd
    assert train[2][1] == "kdqat:kd"
    assert [(r[0], r[3]) for r in log.rows if r[2] == "dev"] == [(3, {"acc": 0.5}), (5, {"acc": 0.7})]
    assert best == [{"acc": 0.5}, {"acc": 0.7}]
    assert dev.state_dict() == {"best": 0.7, "best_metrics": {"acc": 0.7}, "last_metrics": {"acc": 0.7}}


def test_checkpointed_state_has_the_keys_of_kdqat_state_json():
    window, dev = callbacks(FakeLog(), [])
    saver = Checkpoint(engine=None, folder="unused", rank=0, every=4, keep=1, parts=(window, dev))
    window.sums, window.count = {"total": 3.0}, 2
    record = saver.loop_state(LoopState(micro=8, step=4, total_steps=9))
    assert record == {"micro": 8, "window": {"sums": {"total": 3.0}, "count": 2}, "best": None,
                      "best_metrics": {}, "last_metrics": {}}
    saver.restored = {"micro": 4, "extra": 1}  # a restored key that no part owns is carried over
    assert saver.loop_state(LoopState(micro=8, step=4, total_steps=9))["extra"] == 1


def test_a_loop_resumed_from_the_checkpointed_state_logs_the_same_rows():
    full_log = FakeLog()
    run_loop(iter(range(100)), step_fn, PHASES, LoopState(0, 0, 6), 2, list(callbacks(full_log, [])))

    first_log = FakeLog()
    window, dev = callbacks(first_log, [])
    saver = Checkpoint(None, "unused", 0, 4, 1, parts=(window, dev))
    state = LoopState(0, 0, 6)
    run_loop(iter(range(100)), step_fn, PHASES, state, 2, [window, dev, StopAt(3)])  # stops mid-window
    saved = saver.loop_state(state)

    second_log = FakeLog()
    window, dev = callbacks(second_log, [], evaluations_done=1)
    for part in (window, dev):
        part.load_state_dict(saved)
    run_loop(iter(range(saved["micro"], 100)), step_fn, PHASES, LoopState(saved["micro"], 3, 6), 2, [window, dev])
    assert first_log.rows + second_log.rows == full_log.rows
