"""The text surgery under the `rules` editing commands: item spans, style detection, and the
line merge that keeps every byte an edit did not touch."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.cli.yamlsplice import Style, detect_style, dump_item, edit_item, merge_lines, spans
from tests.test_cli_ops_kit import SOLAR

LINES = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "  d\n", "# e\n", "\n"]), max_size=12)


@given(LINES, LINES)
def test_merge_is_the_edit_when_the_round_trip_was_exact(
    original: list[str], edited: list[str]
) -> None:
    assert merge_lines(original, original, edited) == edited


@given(LINES)
def test_merge_of_no_edit_is_the_original(original: list[str]) -> None:
    respelled = [line.replace("  d", "    d") for line in original]  # a lossy round trip
    assert merge_lines(original, respelled, respelled) == original


@given(LINES, st.integers(0, 11), st.sampled_from(["X\n", "Y\n"]))
def test_merge_keeps_respelled_lines_far_from_the_edit(
    original: list[str], at: int, new: str
) -> None:
    respelled = [line.replace("  d", "    d") for line in original]
    edited = list(respelled)
    edited.insert(min(at, len(edited)), new)
    merged = merge_lines(original, respelled, edited)
    assert merged.count(new) == original.count(new) + 1
    # Lines the round trip kept and the edit did not touch are all still there, in order.
    kept = [line for line in original if "  d" not in line]
    assert [line for line in merged if line != new and "d" not in line] == [
        line for line in kept if line != new
    ]


def test_spans_give_each_postback_its_comment_and_lines() -> None:
    lines = SOLAR.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("  - id:")]
    found = spans(lines, starts, len(lines))
    assert [(s.lead, s.dash, s.end) for s in found] == [(4, 5, 15), (16, 17, 34), (35, 36, 45)]
    assert lines[found[0].end - 1].startswith("      url: https://tracker")
    assert lines[found[0].end] == "\n"
    assert lines[found[2].end] == "# end of offer 1234\n"  # the trailer is not the item's


def test_style_is_read_from_the_file() -> None:
    lines = SOLAR.splitlines(keepends=True)
    first = spans(lines, [5], 16)[0]
    assert detect_style(lines, 3, first) == Style(mapping=2, sequence=4, offset=2)
    flat = ["postbacks:\n", "- id: 1\n", "  action:\n", "      type: ping_url\n"]
    assert detect_style(flat, 0, spans(flat, [1], 4)[0]) == Style(mapping=4, sequence=2, offset=0)


def test_an_item_round_trips_exactly_through_an_empty_edit() -> None:
    lines = SOLAR.splitlines(keepends=True)[17:34]
    assert edit_item(lines, Style(), lambda item: None) == lines


def test_a_new_item_uses_double_quotes_and_inline_flow_values() -> None:
    from ruamel.yaml.comments import CommentedMap

    from daemon.cli.editing import to_yaml

    item = CommentedMap([("id", 5), ("affiliate", "*"), ("when", to_yaml({"==": [1, 1]}))])
    assert dump_item(item, Style()) == [
        "  - id: 5\n",
        '    affiliate: "*"\n',
        "    when: {==: [1, 1]}\n",
    ]
