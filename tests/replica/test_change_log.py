"""The change log behind the change feed (ekko.replica.change_log): cursors, limits,
bounded memory, resets."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.core.errors import UsageError
from ekko.replica.change_log import ChangeLog, parse_cursor


def test_changes_after_a_cursor_come_once_sorted_and_per_table():
    log = ChangeLog(epoch=5)
    start = log.cursor("m")
    log.note("m", "a", np.array([9, 1]))
    log.note("m", "b", np.array([4]))
    log.note("m", "a", np.array([1, 2]))
    log.note("other", "a", np.array([100]))
    got = log.since("m", start)
    assert not got.reset and not got.more
    assert {t: ids.tolist() for t, ids in got.tables.items()} == {"a": [1, 2, 9], "b": [4]}
    assert got.cursor == "5-3" and log.cursor("m") == "5-3" and log.cursor("other") == "5-1"
    mid = log.since("m", "5-1")
    assert {t: ids.tolist() for t, ids in mid.tables.items()} == {"b": [4], "a": [1, 2]}
    assert log.since("m", got.cursor).tables == {}
    log.note("m", "a", np.zeros(0, np.int64))          # nothing changed: no record
    assert log.cursor("m") == "5-3"


def test_a_limited_answer_says_more_and_the_next_one_goes_on():
    log = ChangeLog(epoch=1)
    for i in range(5):
        log.note("m", "t", np.arange(i * 10, i * 10 + 10))
    first = log.since("m", "1-0", max_rows=25)
    assert first.more and first.cursor == "1-2" and len(first.tables["t"]) == 20     # whole records
    rest = log.since("m", first.cursor, max_rows=25)
    assert rest.more and rest.cursor == "1-4"
    last = log.since("m", rest.cursor, max_rows=25)
    assert not last.more and last.cursor == "1-5" and last.tables["t"].tolist() == list(range(40, 50))
    big = log.since("m", "1-0", max_rows=3)                # one record is never split: at least one
    assert len(big.tables["t"]) == 10 and big.cursor == "1-1"


def test_a_reader_behind_what_the_log_keeps_resets():
    log = ChangeLog(epoch=2, max_rows=30)
    for i in range(6):
        log.note("m", "t", np.arange(i * 10, i * 10 + 10))   # 60 rows noted, 30 kept
    assert log.since("m", "2-0").reset
    assert log.since("m", "2-2").reset                        # record 3 dropped too
    ok = log.since("m", "2-3")
    assert not ok.reset and ok.tables["t"].tolist() == list(range(30, 60))
    assert log.since("m", "2-7").reset                        # ahead of the log: not this log's
    assert log.since("m", "3-0").reset and log.since("m", "3-0").cursor == "2-6"   # another epoch


def test_bad_cursors_are_refused():
    log = ChangeLog(epoch=1)
    for bad in ("", "1", "a-1", "1-b", "-1-2", "1-2-3", "1" * 60 + "-1"):
        with pytest.raises(UsageError, match="cursor"):
            log.since("m", bad)
    assert parse_cursor("12-0") == (12, 0)
    with pytest.raises(UsageError):
        ChangeLog(epoch=1, max_rows=0)
