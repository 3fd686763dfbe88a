"""Sources, user corpora and the mixture (data/sources.py, seed section 1.1)."""

import json

import pytest

from data.errors import DataError
from data.sources import (Document, docstrings_and_comments, html_to_text, mix, parse_source_flag,
                          path_source, stdlib_code_source, stdlib_prose_source, text_list_source)


def test_malformed_jsonl_lines_are_reported_with_file_and_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([
        json.dumps({"text": "first document"}),
        "{not json",
        json.dumps({"body": "wrong field"}),
        "",
        json.dumps({"text": 42}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "second document"}),
    ]) + "\n")
    problems = []
    docs = path_source("web", str(path)).load(10**9, 0, problems)
    assert [d.text for d in docs] == ["first document", "second document"]
    assert [d.origin for d in docs] == [f"{path}:1", f"{path}:7"]
    assert [p.split(": ")[0] for p in problems] == [f"{path}:2", f"{path}:3", f"{path}:5", f"{path}:6"]
    assert "invalid JSON" in problems[0] and "'text'" in problems[1]


def test_lone_surrogates_in_json_do_not_crash(tmp_path):
    from data.curate import normalise_text

    (tmp_path / "s.jsonl").write_text('{"text": "broken \\ud800 pair"}\n')
    (doc,) = path_source("x", str(tmp_path)).load(10**9, 0, [])
    assert normalise_text(doc.text)[0] == "broken \ufffd pair"


def test_text_field_is_configurable(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    docs = path_source("x", str(tmp_path), text_field="content").load(10**9, 0, [])
    assert [d.text for d in docs] == ["hello"]


def test_directory_of_mixed_files(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.html").write_text(
        "<html><head><title>T</title><style>p{}</style></head><body><nav>Home | About</nav>"
        "<p>Visible &amp; kept.</p><script>var x = 1;</script><footer>(c) 2024</footer></body></html>")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / "d.txt").write_bytes(b"\x00\x00\x00 binary posing as text")
    problems = []
    docs = path_source("web", str(tmp_path)).load(10**9, 0, problems)
    assert sorted(d.text for d in docs) == ["Visible & kept.", "plain text file"]
    assert any("c.bin: unsupported extension" in p for p in problems)
    assert any("d.txt: binary file" in p for p in problems)


def test_html_to_text_strips_markup_and_boilerplate():
    text = html_to_text("<div>One<br>Two</div><aside>ad</aside><ul><li>Three</li></ul><p>a  \n b</p>")
    assert text.splitlines() == ["One", "Two", "Three", "a b"]


def test_invalid_utf8_survives_loading_for_normalise_to_count(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"valid \xff\xfe invalid")
    (doc,) = path_source("x", str(tmp_path)).load(10**9, 0, [])
    assert "\udcff" in doc.text  # surrogateescape keeps the byte; normalise_text replaces it


def test_missing_path_and_bad_flags_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        parse_source_flag(f"web={tmp_path}/missing:0.5")
    for bad in ["nameonly", "=path", f"web={tmp_path}:-1", f"web={tmp_path}:0"]:
        with pytest.raises(DataError, match="--source"):
            parse_source_flag(bad)


def test_parse_source_flag_weights_and_kinds(tmp_path):
    source = parse_source_flag(f"code={tmp_path}:0.7")
    assert (source.name, source.weight, source.kind) == ("code", 0.7, "code")
    source = parse_source_flag(f"web={tmp_path}:0.3:code")
    assert (source.weight, source.kind) == (0.3, "code")
    source = parse_source_flag(f"books={tmp_path}")
    assert (source.weight, source.kind) == (1.0, "prose")
    assert parse_source_flag("py=stdlib-code:2").kind == "code"


def test_stdlib_sources_are_offline_and_budgeted():
    problems = []
    code = stdlib_code_source().load(300_000, 0, problems)
    prose = stdlib_prose_source().load(300_000, 0, problems)
    assert code and prose and all(d.kind == "code" for d in code) and all(d.kind == "prose" for d in prose)
    # Documents are taken until their bytes reach the budget, the last one included: one fewer would be short.
    for docs in (code, prose):
        sizes = [len(d.text.encode("utf-8", "surrogateescape")) for d in docs]
        assert sum(sizes[:-1]) < 300_000 <= sum(sizes)
    assert prose[0].origin.startswith("pydoc_data.topics:")  # the Language Reference comes first
    assert {d.origin for d in code}.isdisjoint(d.origin.split(" (")[0] for d in prose)


def test_docstrings_and_comments():
    source = ('"""Module doc."""\n# A comment block\n# on two lines.\n'
              'def f():\n    """Function doc."""\n    return 1  # trailing\n')
    assert docstrings_and_comments(source).split("\n\n") == ["Module doc.", "Function doc.",
                                                               "A comment block on two lines."]
    problems = []
    assert docstrings_and_comments("print 'py2'\n# still a comment", "old.py", problems) == "still a comment"
    assert problems and problems[0].startswith("old.py:1:")


def test_text_list_source_is_the_hook_for_tasks():
    source = text_list_source("tasks", ["Q: 1+1? A: 2", "Q: 2+2? A: 4"], weight=0.1)
    docs = source.load(10**9, 0, [])
    assert [d.origin for d in docs] == ["tasks[0]", "tasks[1]"] and docs[0].source == "tasks"


def test_mixture_hits_target_shares():
    docs = {"a": [Document("x" * 100, "a", f"a{i}") for i in range(100)],
            "b": [Document("y" * 100, "b", f"b{i}") for i in range(20)]}
    chosen, info = mix(docs, {"a": 3, "b": 1}, max_bytes=10**9, seed=0)
    # b has 2,000 bytes for a 25% share, so the total is 8,000: 6,000 from a, 2,000 from b
    assert info["a"]["bytes"] == 6000 and info["b"]["bytes"] == 2000
    assert info["a"]["target_share"] == 0.75 and len(chosen) == 80
    chosen, info = mix(docs, {"a": 1, "b": 1}, max_bytes=1000, seed=0)
    assert info["a"]["bytes"] == 500 and info["b"]["bytes"] == 500


def test_pieces_of_a_jsonl_file_own_the_lines_that_start_in_them(tmp_path):
    """A file cut at every byte: a piece [a, b) starts reading at the first line starting at or after
    a, and the lines counted in consecutive pieces add up to the file's (checked against the line
    starts found by hand: byte 0 and every byte after a newline)."""
    from data.sources import first_record_at, lines_starting_in

    path = tmp_path / "f.jsonl"
    data = b'{"text": "a"}\n\n{"text": "bc"}\nx\n{"text": "d"}'  # an empty line, no final newline
    path.write_bytes(data)
    starts = [0] + [p + 1 for p, byte in enumerate(data) if byte == ord("\n") and p + 1 < len(data)]
    for a in range(len(data) + 1):
        assert first_record_at(str(path), a) == min([s for s in starts if s >= a], default=len(data)), a
        for b in range(a, len(data) + 1):
            assert lines_starting_in(str(path), a, b) == sum(a <= s < b for s in starts), (a, b)
    path.write_bytes(b"\x00binary\n" + data)
    assert first_record_at(str(path), 5) is None  # binary: reading from 0 reports it, once
