"""Text sources, the document split and the source fingerprint."""

import json
import shutil
from itertools import islice

import pytest

from burrow.data import (
    SourceStats,
    iter_documents,
    resolve_source,
    source_fingerprint,
    split_of,
    stdlib_root,
)
from burrow.data.sources import source_files
from burrow.errors import UserError


def write(path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)


def documents(source, **options) -> list[tuple[str, str]]:
    return [(d.name, d.text) for d in iter_documents(str(source), **options)]


def test_text_file_is_one_document_kept_byte_for_byte(tmp_path):
    write(tmp_path / "notes.txt", "line one\r\n\ttabbed  \n\x00end")
    assert documents(tmp_path / "notes.txt") == [("notes.txt", "line one\r\n\ttabbed  \n\x00end")]


def test_directory_is_recursive_sorted_and_filtered(tmp_path):
    write(tmp_path / "b.txt", "b")
    write(tmp_path / "a" / "z.md", "z")
    write(tmp_path / "a" / "y.py", "y")
    write(tmp_path / "c.json", "not a text extension")
    write(tmp_path / ".hidden" / "h.txt", "hidden directory")
    write(tmp_path / ".h.txt", "hidden file")
    write(tmp_path / "empty.txt", "")
    assert documents(tmp_path) == [("a/y.py", "y"), ("a/z.md", "z"), ("b.txt", "b")]
    assert documents(tmp_path, extensions=(".json",)) == [("c.json", "not a text extension")]


def test_jsonl_gives_one_document_per_line(tmp_path):
    lines = [{"text": "first"}, {"text": ""}, {"text": "third", "id": 3}]
    write(tmp_path / "d.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert documents(tmp_path / "d.jsonl") == [("d.jsonl:1", "first"), ("d.jsonl:3", "third")]
    write(tmp_path / "e.jsonl", json.dumps({"body": "x\u2581y"}) + "\n")
    assert documents(tmp_path / "e.jsonl", text_field="body") == [("e.jsonl:1", "x\u2581y")]


def test_non_utf8_documents_are_skipped_and_counted(tmp_path):
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))
    write(tmp_path / "lines.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    stats = SourceStats()
    assert [d.name for d in iter_documents(str(tmp_path), stats=stats)] == ["good.txt"]
    assert (stats.documents, stats.skipped_non_utf8) == (1, 1)
    assert stats.warning() == "warning: skipped 1 documents that are not valid UTF-8"
    stats = SourceStats()
    assert [d.text for d in iter_documents(str(tmp_path / "lines.jsonl"), stats=stats)] == ["ok"]
    assert stats.skipped_non_utf8 == 1
    assert SourceStats().warning() is None


@pytest.mark.parametrize(
    ("files", "source", "options", "message"),
    [
        ({}, "missing.txt", {}, "does not exist"),
        ({"empty.txt": ""}, "empty.txt", {}, "is empty"),
        ({"x.json": "{}"}, ".", {}, "holds no files ending in"),
        ({"bad.txt": b"\xff\xfe\xfa"}, ".", {}, "no readable text"),
        ({"only.txt": ""}, ".", {}, "no readable text"),
        ({"d.jsonl": '{"text": "a"}\n{oops\n'}, "d.jsonl", {}, r"d.jsonl:2 is not valid JSON"),
        ({"d.jsonl": '{"body": "a"}\n'}, "d.jsonl", {}, r"no string field 'text' \(fields: body"),
        ({"d.jsonl": '{"text": 5}\n'}, "d.jsonl", {}, "no string field 'text'"),
        ({"d.jsonl": '["text"]\n'}, "d.jsonl", {}, "no string field"),
        ({"d.jsonl": "\n\n"}, "d.jsonl", {}, "no readable text"),
    ],
)
def test_user_errors(tmp_path, files, source, options, message):
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        list(iter_documents(str(tmp_path / source), **options))


def test_stdlib_corpus_is_sorted_py_files_without_site_packages():
    root = stdlib_root()
    assert (root / "site-packages").is_dir()  # so that leaving it out is tested
    names = [name for name, _ in source_files("stdlib")]
    assert names == sorted(names) and len(names) > 1000
    assert all(name.endswith(".py") for name in names)
    assert not any("site-packages" in name.split("/") for name in names)
    assert "os.py" in names and "json/decoder.py" in names
    first = list(islice(iter_documents("stdlib"), 3))
    assert [d.name for d in first] == [n for n in names if (root / n).stat().st_size][:3]
    assert first[0].text == (root / first[0].name).read_text("utf-8")


def test_split_is_by_name_deterministic_and_about_two_percent():
    names = [name for name, _ in source_files("stdlib")]
    val = [name for name in names if split_of(name, 0.02) == "val"]
    assert 0.01 < len(val) / len(names) < 0.035
    assert val == [name for name in names if split_of(name, 0.02) == "val"]
    # a larger fraction holds out a superset; 0 holds out nothing
    assert all(split_of(name, 0.2) == "val" for name in val)
    assert all(split_of(name, 0.0) == "train" for name in names)


def test_split_depends_on_the_name_alone(tmp_path):
    names = [f"doc{i}.txt" for i in range(400)]
    for i, name in enumerate(names):
        write(tmp_path / name, f"same text {i % 2}")
    expected = {name: split_of(name, 0.3) for name in names}
    got = {d.name: split_of(d.name, 0.3) for d in iter_documents(str(tmp_path))}
    assert got == expected
    assert 0.2 < sum(split == "val" for split in got.values()) / len(names) < 0.4


def test_fingerprint_follows_content_not_place(tmp_path):
    write(tmp_path / "a" / "one.txt", "hello world")
    write(tmp_path / "a" / "sub" / "two.md", "second")
    first = source_fingerprint(str(tmp_path / "a"))
    assert first == source_fingerprint(str(tmp_path / "a"))
    assert len(first) == 16 and int(first, 16) >= 0
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert source_fingerprint(str(tmp_path / "copy")) == first
    write(tmp_path / "a" / "one.txt", "hello WORLD")  # same size, other bytes
    edited = source_fingerprint(str(tmp_path / "a"))
    assert edited != first
    (tmp_path / "a" / "one.txt").rename(tmp_path / "a" / "uno.txt")
    renamed = source_fingerprint(str(tmp_path / "a"))
    assert renamed not in (first, edited)
    write(tmp_path / "a" / "three.txt", "more")
    assert source_fingerprint(str(tmp_path / "a")) not in (first, edited, renamed)


def test_resolve_source_makes_existing_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_source("notes.txt") == str(tmp_path.resolve() / "notes.txt")
    assert resolve_source(".") == str(tmp_path.resolve())
    assert resolve_source("stdlib") == "stdlib"
    assert resolve_source("missing.txt") == "missing.txt"  # left for iter_documents to report
