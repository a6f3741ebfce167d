"""The one chunk plan both decode paths follow (a pure function: no model needed)."""

from __future__ import annotations

from radio.musicgen.plan import ChunkPlan, plan_chunk

K = 3  # warm-up steps of a 4-codebook mono pattern


def test_new_stations_are_prefilled_and_the_chunk_takes_the_warm_up_steps() -> None:
    assert plan_chunk(2, {}, window=1500, frames=200, warmup=K) == ChunkPlan((), (0, 1), (), 203)


def test_continuing_rows_keep_their_cache_and_take_exactly_the_chunks_frames() -> None:
    plan = plan_chunk(3, {0: 600, 2: 700}, window=1500, frames=200, warmup=K)
    assert plan == ChunkPlan(keep=(0, 2), fresh=(1,), resets=(), steps=203)
    assert plan_chunk(2, {0: 600, 1: 700}, 1500, 200, K).steps == 200


def test_a_row_that_would_outgrow_the_window_resets() -> None:
    plan = plan_chunk(2, {0: 1400, 1: 500}, window=1500, frames=200, warmup=K)
    assert plan == ChunkPlan(keep=(1,), fresh=(0,), resets=(0,), steps=203)


def test_resets_due_soon_are_spread_one_per_chunk_unless_held() -> None:
    due = {0: 1000, 1: 1000, 2: 1000}  # all three have two chunks left: they would reset together
    plan = plan_chunk(3, due, window=1500, frames=200, warmup=K)
    assert len(plan.resets) == 1 and plan.fresh == plan.resets and len(plan.keep) == 2
    assert plan_chunk(3, due, 1500, 200, K, spread=False).resets == ()
