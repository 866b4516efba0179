"""The statements' filters: dead letters selected by age and agent."""

from __future__ import annotations

import time

import pytest

from valmi_sidecar.store import DeadLetterFilter

from .conftest import Clock, OpenStore, dead_letter


@pytest.fixture
def clock() -> Clock:
    """These tests compare with the wall clock: the store's clock starts now."""
    return Clock(time.time())


async def test_dead_letter_filters_by_age_and_agent(open_store: OpenStore) -> None:
    store = await open_store()
    await dead_letter(store, 2)
    now = time.time()
    assert 2 == await store.count_dead_letters(DeadLetterFilter(dead_after=now - 60))
    assert 0 == await store.count_dead_letters(DeadLetterFilter(dead_before=now - 60))
    assert 0 == await store.count_dead_letters(DeadLetterFilter(agent_key="agent_z"))
    first = (await store.dead_letters(1))[0]
    page = await store.dead_letters(10, DeadLetterFilter(after_seq=first.seq))
    assert 1 == len(page)
    assert first.seq < page[0].seq
