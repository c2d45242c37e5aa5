"""The control socket's lines and the Outcome codec (wire)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from graceful_http.wire import OUTCOME, Outcome, decode, encode, encode_outcome, outcome_text, parse_outcome


def test_format_line():
    assert encode_outcome(Outcome("done", "generation 2 (pid 5) is serving", 5)) == (
        b"done 5 generation 2 (pid 5) is serving\n")
    assert encode_outcome(Outcome("failed", "importing 'app' raised\nRuntimeError:  x", 9)) == (
        b"failed 9 importing 'app' raised RuntimeError: x\n")  # one line, whatever the detail held
    assert encode_outcome(Outcome("refused", "reload already in progress", None)) == (
        b"refused 0 reload already in progress\n")


def test_parse_line():
    assert parse_outcome("started 77 reloading: starting pid 77\n") == (
        Outcome("started", "reloading: starting pid 77", 77))
    assert parse_outcome("failed x detail") == Outcome("failed", "detail", None)
    assert parse_outcome("refused 0 the service is stopping").pid == 0


words = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2FFF, blacklist_categories=("Cs", "Zs",
                                                                                                    "Zl", "Zp", "Cc")),
                min_size=1, max_size=12)


@given(code=st.sampled_from(["started", "done", "failed", "refused"]),
       pid=st.integers(min_value=1, max_value=2**22),
       detail=st.lists(words, max_size=8).map(" ".join))
def test_control_line_round_trip(code, pid, detail):
    outcome = Outcome(code, detail, pid)
    line = encode_outcome(outcome)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_outcome(line.decode()) == Outcome(code, detail, pid)


@given(detail=st.text(max_size=60))
def test_control_line_round_trip_normalises_whitespace(detail):
    line = encode_outcome(Outcome("failed", detail, 3)).decode()
    assert line.count("\n") == 1
    assert parse_outcome(line) == Outcome("failed", " ".join(detail.split()), 3)


def test_a_line_is_a_word_and_a_one_line_detail():
    assert encode("failed", "cannot import\n  'app'") == b"failed cannot import 'app'\n"
    assert encode("ready") == b"ready\n"
    assert decode(b"stats 3 17\n") == ("stats", "3 17")
    assert decode("serving") == ("serving", "")


@given(code=st.sampled_from(["started", "done", "failed", "refused"]),
       pid=st.none() | st.integers(min_value=1, max_value=2**22),
       detail=st.lists(words, max_size=8).map(" ".join))
def test_outcome_round_trip_on_the_worker_channel(code, pid, detail):
    word, text = decode(encode(OUTCOME, outcome_text(Outcome(code, detail, pid))))
    assert word == OUTCOME
    assert parse_outcome(text) == Outcome(code, detail, pid or 0)
