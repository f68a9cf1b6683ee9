from enduro.tokenizer import StopStringMatcher


def test_stop_string_cuts_text_and_holds_back_partial_matches() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.add("hello E") == "hello "
    assert matcher.add("N") == ""
    assert matcher.add("D and more") == ""
    assert matcher.stopped
    assert matcher.text == "hello "


def test_held_back_text_is_released_when_it_cannot_be_a_stop() -> None:
    matcher = StopStringMatcher(("END",))
    assert matcher.add("hello EN") == "hello "
    assert matcher.add("X") == "ENX"
    assert matcher.flush() == ""
    assert matcher.text == "hello ENX"
    assert not matcher.stopped


def test_earliest_stop_wins_and_include_stop() -> None:
    matcher = StopStringMatcher(("b", "abc"), include_stop=True)
    matcher.add("xxabcd")
    assert matcher.text == "xxab"


def test_no_stop_strings_streams_everything() -> None:
    matcher = StopStringMatcher(())
    assert matcher.add("abc") == "abc"
    assert matcher.flush() == ""
