"""Where the raw text comes from, and how several sources are mixed (seed Part 1, section 1.1).

A pretraining corpus is a *mixture* of sources — GPT-3 used ~60% web, ~22% books, ~8% Wikipedia
and the rest code — and the ratios are a design decision of their own. Here a `Source` is a name,
a weight (its target share of the final text), a kind ("prose", "code" or "curated": it selects
the quality rules in data/curate.py) and a loader that returns `Document`s.

Sources available:

* `stdlib_code_source`  — the standard library's `.py` files, one document per file. Real code
  written by people, with the licence headers, generated tables (encodings/cp*.py) and copied
  test fixtures that a real crawl also has: the curation stages have something to find.
* `stdlib_prose_source` — English prose of the same install: the Language Reference bundled as
  `pydoc_data.topics`, the `.txt`/`.rst` files shipped with the library, and per module its
  docstrings and comment blocks — from the other half of the .py files than the code source
  reads, so that no text is in both sources.
* `path_source` — a user corpus: a file or a directory of `.txt`/`.md`/`.rst`/`.py` (one document
  per file), `.jsonl` (one document per line, in a `text` field by default) and `.html`/`.htm`
  (tags, scripts, navigation and other boilerplate stripped with html.parser).
* `text_list_source` — a list of strings; the hook through which a later stage adds its "tasks".

Nothing is downloaded. Malformed input (a bad JSON line, a missing field, an unreadable or binary
file) is appended to a `problems` list as "file:line: reason" and skipped: one bad document never
stops the run. Text is decoded as UTF-8 with `surrogateescape`, so invalid bytes survive as lone
surrogates until data/curate.py's `normalise_text` replaces and counts them.
"""

import array
import ast
import html.parser
import json
import os
import random
import sysconfig
import warnings
import dataclasses
from dataclasses import dataclass
from typing import Callable

from data.errors import DataError

# "curated" is for text that is clean by construction (generated tasks): it skips the heuristic
# and perplexity filters, which were designed for web text, but is still deduplicated and
# decontaminated.
KINDS = ("prose", "code", "curated")
PLAIN_TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py")
HTML_EXTENSIONS = (".html", ".htm")
JSONL_EXTENSIONS = (".jsonl",)


@dataclass
class Document:
    text: str
    source: str  # name of the mixture source it belongs to
    origin: str  # where it came from: a path, "path:line", or "pydoc_data.topics:name"
    kind: str = "prose"  # "prose", "code" or "curated": which quality rules apply


@dataclass
class Source:
    name: str
    weight: float  # target share of the final mixture (normalised over all sources)
    kind: str
    load: Callable  # load(max_bytes, seed, problems) -> list[Document]
    description: str = ""
    path: str = ""  # a user corpus's file or directory ("" for the built-in and in-memory sources)
    stream: Callable = None  # stream(max_bytes, seed, problems) -> iterator of the same Documents, read lazily
    text_field: str = "text"  # the JSON field a user corpus's .jsonl records keep their text in

    def documents(self, max_bytes, seed, problems):
        """The documents `load` returns, one at a time (data/stream.py reads sources this way)."""
        return self.stream(max_bytes, seed, problems) if self.stream else iter(self.load(max_bytes, seed, problems))


def streamed_source(name, weight, kind, stream, description="", path=""):
    """A Source whose `load` is the list of what `stream` yields."""
    return Source(name, weight, kind, lambda *a: list(stream(*a)), description, path, stream)


def decode(raw: bytes) -> str:
    """UTF-8 → str, keeping invalid bytes as lone surrogates for normalise_text to count."""
    return raw.decode("utf-8", errors="surrogateescape")


def utf8(text: str) -> bytes:
    """The inverse of `decode`: str → the original bytes (invalid ones included). A lone surrogate
    that did not come from `decode` (JSON can spell one: "\\ud800") becomes "?"."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace")


def read_budgets(source_list, max_bytes, overread):
    """Raw UTF-8 bytes to read of each source: its share of max_bytes × overread (curation then
    removes some; the mixture takes max_bytes)."""
    total_weight = sum(s.weight for s in source_list)
    return [int(max_bytes * overread * s.weight / total_weight) for s in source_list]


def take_until(documents, max_bytes):
    """Documents from an iterator until their UTF-8 size reaches max_bytes (the last one included)."""
    total = 0
    for doc in documents:
        if total >= max_bytes:
            return
        yield doc
        total += len(utf8(doc.text))


# -----------------------------------------------------------------------------
# The standard library: the default corpus
# -----------------------------------------------------------------------------

def stdlib_directory() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(extensions, seed=0):
    """Files under the stdlib directory with these extensions, in a seeded shuffled order.

    Installed third-party packages (site-packages) are not part of the standard library.
    """
    root = stdlib_directory()
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        found.extend(os.path.join(directory, f) for f in sorted(files) if f.endswith(extensions))
    random.Random(seed).shuffle(found)
    return found


def looks_binary(head: bytes) -> bool:
    """Text files have no NUL bytes; binary ones almost always have one in their first 8 KB."""
    return b"\x00" in head[:8192]


def _read_file(path, problems):
    """The bytes of a file, or None (with a problem recorded) if unreadable or binary."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        problems.append(f"{path}: unreadable ({e.strerror})")
        return None
    if looks_binary(raw):
        problems.append(f"{path}: binary file, skipped")
        return None
    return raw


def stdlib_python_halves(seed=0):
    """The stdlib's .py files, shuffled and cut in two disjoint halves: (code half, prose half).

    The code source reads whole files from the first half; the prose source takes docstrings
    and comments from the second half only, so no sentence is in both sources.
    """
    files = stdlib_files((".py",), seed)
    return files[:len(files) // 2], files[len(files) // 2:]


def _iter_stdlib_code(seed, problems):
    for path in stdlib_python_halves(seed)[0]:
        raw = _read_file(path, problems)
        if raw is not None:
            yield Document(decode(raw), "code", path, "code")


def stdlib_code_source(weight=0.6, name="code") -> Source:
    def stream(max_bytes, seed, problems):
        return take_until(_iter_stdlib_code(seed, problems), max_bytes)

    return streamed_source(name, weight, "code", stream, "Python standard library .py files")


def docstrings_and_comments(source_text, path="<string>", problems=None) -> str:
    """The English inside a Python file: its docstrings and its blocks of `#` comments.

    Docstrings come from the syntax tree (module, classes, functions); comments are runs of
    consecutive lines starting with '#', joined into paragraphs. A file that does not parse
    (old Python 2 test fixtures) still gives its comments, and is reported.
    """
    parts = []
    try:
        with warnings.catch_warnings():  # old files warn about invalid escapes like "\(": not our concern
            warnings.simplefilter("ignore")
            tree = ast.parse(source_text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    parts.append(docstring)
    except (SyntaxError, ValueError) as e:
        if problems is not None:
            problems.append(f"{path}:{getattr(e, 'lineno', '?')}: not valid Python 3, comments only")
    block = []
    for line in source_text.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            block.append(stripped.lstrip("#").strip())
        elif block:
            paragraph = " ".join(w for w in block if w)
            if any(c.isalpha() for c in paragraph):
                parts.append(paragraph)
            block = []
    return "\n\n".join(parts)


def _iter_stdlib_prose(seed, problems):
    try:  # the Language Reference, shipped for help(); present on every CPython
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    for topic in sorted(topics):
        yield Document(topics[topic], "prose", f"pydoc_data.topics:{topic}", "prose")
    for path in stdlib_files((".txt", ".rst"), seed):
        raw = _read_file(path, problems)
        if raw is not None:
            yield Document(decode(raw), "prose", path, "prose")
    for path in stdlib_python_halves(seed)[1]:
        raw = _read_file(path, problems)
        if raw is not None:
            text = docstrings_and_comments(decode(raw), path, problems)
            if text:
                yield Document(text, "prose", f"{path} (docstrings and comments)", "prose")


def stdlib_prose_source(weight=0.4, name="prose") -> Source:
    def stream(max_bytes, seed, problems):
        return take_until(_iter_stdlib_prose(seed, problems), max_bytes)

    return streamed_source(name, weight, "prose", stream,
                           "Language Reference (pydoc_data), stdlib .txt/.rst, docstrings and comments")


def default_sources():
    """The offline default: 60% code, 40% prose — a code-heavy mixture in the spirit of the
    seed's remark that code-heavy data (DeepSeek, LLaMA 3) helps reasoning."""
    return [stdlib_code_source(0.6), stdlib_prose_source(0.4)]


# -----------------------------------------------------------------------------
# User corpora
# -----------------------------------------------------------------------------

class _HTMLText(html.parser.HTMLParser):
    """Collects the visible text of a page; drops scripts, styles and navigation boilerplate."""

    SKIP = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form",
            "head", "button", "select"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "main", "pre",
             "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "dd", "dt", "hr", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.pieces, self.skip_depth, self.pre_depth = [], 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip_depth += 1
        elif tag in self.BLOCK:
            self.pieces.append("\n")
        self.pre_depth += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in self.BLOCK:
            self.pieces.append("\n")
        self.pre_depth = max(0, self.pre_depth - (tag == "pre"))

    def handle_data(self, data):
        if not self.skip_depth:
            # In HTML a line break in the source is just a space, except inside <pre>.
            self.pieces.append(data if self.pre_depth else " ".join(data.split(" ")).replace("\n", " "))


def html_to_text(markup: str) -> str:
    """Visible text of an HTML page: one line per block element (and per line of a <pre>),
    runs of spaces inside a line collapsed, empty lines dropped."""
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = (" ".join(line.split()) for line in "".join(parser.pieces).splitlines())
    return "\n".join(line for line in lines if line)


def read_jsonl(path, text_field, source, kind, problems, offset=0, first_line=1, end=None):
    """(document, byte offset, line number) per line of a JSONL file, from the string field
    `text_field`; bad lines are reported as file:line. `offset` and `first_line` start the reading
    at a record found before (data/stream.py re-reads a chunk's records from there); `end` stops it
    before the first record that starts at or after that byte (a piece of the file, data/stream.py).

    Read line by line, never whole: a JSONL file may be many GB. Lines end at "\n" only (JSON
    strings may hold a raw U+2028, which str.splitlines would also cut at)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        problems.append(f"{path}: unreadable ({e.strerror})")
        return
    with f:
        if offset == 0 and looks_binary(f.read(8192)):
            problems.append(f"{path}: binary file, skipped")
            return
        f.seek(offset)
        for lineno, raw_line in enumerate(f, first_line):
            if end is not None and offset >= end:
                return
            doc = _jsonl_record(raw_line, f"{path}:{lineno}", text_field, source, kind, problems)
            if doc is not None:
                yield doc, offset, lineno
            offset += len(raw_line)


def _jsonl_record(raw_line, where, text_field, source, kind, problems):
    line = decode(raw_line)
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        problems.append(f"{where}: invalid JSON ({e.msg})")
        return None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        problems.append(f"{where}: no string field '{text_field}'")
        return None
    return Document(text, source, where, kind)


def located_documents(path, text_field, source, kind, problems, offset=0, first_line=1, end=None):
    """(document, byte offset, line number) for each document of one user file, chosen by its
    extension: where each one starts, so that a later reader can begin there. A JSONL file is read
    from `offset` (line `first_line`) up to the records starting at `end`; any other file is one
    document at offset 0, line 1."""
    lower = path.lower()
    if lower.endswith(JSONL_EXTENSIONS):
        yield from read_jsonl(path, text_field, source, kind, problems, offset, first_line, end)
        return
    raw = _read_file(path, problems)
    if raw is None:
        return
    if lower.endswith(HTML_EXTENSIONS):
        try:
            yield Document(html_to_text(decode(raw)), source, path, kind), 0, 1
        except Exception as e:  # html.parser is lenient, but a page must never stop the run
            problems.append(f"{path}: HTML not parseable ({type(e).__name__}: {e})")
    else:
        yield Document(decode(raw), source, path, kind), 0, 1


def first_record_at(path, start):
    """The byte offset of the first line of a JSONL file that starts at or after byte `start` (the
    line holding byte start − 1 belongs to whoever reads the bytes before), or None when the file is
    binary or unreadable — reading it from byte 0 reports that, once."""
    if start == 0:
        return 0
    try:
        with open(path, "rb") as f:
            if looks_binary(f.read(8192)):
                return None
            f.seek(start - 1)
            f.readline()
            return f.tell()
    except OSError:
        return None


def lines_starting_in(path, start, end, block=1 << 20):
    """How many lines of a file start in bytes [start, end): byte 0 if start is 0, and each byte
    after a "\n" (at p, with start − 1 ≤ p < end − 1). A count at disk speed, no parsing."""
    count = 1 if start == 0 and end > 0 else 0
    try:
        with open(path, "rb") as f:
            f.seek(max(start - 1, 0))
            remaining = end - 1 - max(start - 1, 0)
            while remaining > 0:
                data = f.read(min(block, remaining))
                if not data:
                    break
                count += data.count(b"\n")
                remaining -= len(data)
    except OSError:
        return 0
    return count


def read_corpus_file(path, text_field, source, kind, problems):
    """The documents of one user file, in order."""
    for doc, _, _ in located_documents(path, text_field, source, kind, problems):
        yield doc


def corpus_files(path, problems):
    """The supported files under `path` (a file or a directory), sorted; others are reported."""
    if os.path.isfile(path):
        return [path]
    found = []
    for directory, subdirs, files in os.walk(path):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            if f.lower().endswith(PLAIN_TEXT_EXTENSIONS + HTML_EXTENSIONS + JSONL_EXTENSIONS):
                found.append(os.path.join(directory, f))
            else:
                problems.append(f"{os.path.join(directory, f)}: unsupported extension, skipped")
    return found


def path_source(name, path, weight=1.0, kind="prose", text_field="text") -> Source:
    """A user corpus at `path`; raises DataError if the path does not exist."""
    if not os.path.exists(path):
        raise DataError(f"--source {name}={path}: no such file or directory")

    def stream(max_bytes, seed, problems):
        def documents():
            for file in corpus_files(path, problems):
                yield from read_corpus_file(file, text_field, name, kind, problems)

        return take_until(documents(), max_bytes)

    return dataclasses.replace(streamed_source(name, weight, kind, stream, f"user corpus {path}", path),
                               text_field=text_field)


def text_list_source(name, texts, weight, kind="curated") -> Source:
    """A source made of given strings — the hook a later stage uses to add its "tasks" texts.
    Its kind defaults to "curated": generated texts skip the filters meant for web text."""
    texts = list(texts)

    def stream(max_bytes, seed, problems):
        return take_until((Document(t, name, f"{name}[{i}]", kind) for i, t in enumerate(texts)), max_bytes)

    return streamed_source(name, weight, kind, stream, f"{len(texts)} texts given in Python")


def parse_source_flag(spec, text_field="text") -> Source:
    """Parse `--source NAME=PATH[:WEIGHT[:KIND]]`, e.g. `code=src/:0.7:code` or `web=pages/:0.3`.

    WEIGHT defaults to 1; KIND defaults to "code" when NAME starts with "code", else "prose".
    The names "stdlib-code" and "stdlib-prose" stand for the built-in sources (no path).
    """
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise DataError(f"--source {spec}: expected NAME=PATH[:WEIGHT[:KIND]]")
    path, weight, kind = rest, 1.0, "code" if name.startswith("code") else "prose"
    parts = rest.rsplit(":", 2)
    # Peel WEIGHT and KIND off the right, so that a path may itself contain ':'.
    if len(parts) >= 2 and parts[-1] in KINDS and _is_number(parts[-2]):
        path, weight, kind = ":".join(parts[:-2]), float(parts[-2]), parts[-1]
    elif _is_number(parts[-1]):
        path, weight = rest.rsplit(":", 1)[0], float(parts[-1])
    elif len(parts) >= 2 and parts[-1] in KINDS:
        raise DataError(f"--source {spec}: KIND must follow a WEIGHT (NAME=PATH:WEIGHT:KIND)")
    if not weight > 0:
        raise DataError(f"--source {spec}: the weight must be positive")
    if path in ("stdlib-code", "stdlib-prose"):
        maker = stdlib_code_source if path == "stdlib-code" else stdlib_prose_source
        return maker(weight, name)
    return path_source(name, path, weight, kind, text_field)


def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False


# -----------------------------------------------------------------------------
# The mixture
# -----------------------------------------------------------------------------

def mix_positions(sizes_by_source, weights, max_bytes, seed=0):
    """Sample documents so that source i contributes a share w_i of the bytes (w normalised).

    With C_i curated bytes available in source i, the largest total T the mixture can reach
    without repeating documents is  T = min(max_bytes, min_i C_i / w_i);  source i then gives
    w_i·T bytes of randomly chosen documents. (Up-sampling a small source for several epochs is
    the other option; it is left out so that no document is seen twice.)

    Works on sizes alone, so that data/stream.py can mix documents that live on disk:
    sizes_by_source maps a source to the UTF-8 sizes of its documents. Returns
    ({source: array of the chosen positions, in the order drawn}, {source: {"target_share",
    "available_bytes", "bytes"}}). Positions are 8-byte array entries, not Python objects.
    """
    total_weight = sum(weights.values())
    shares = {name: w / total_weight for name, w in weights.items()}
    available = {name: int(sum(sizes_by_source.get(name, ()))) for name in shares}
    reachable = [available[n] / shares[n] for n in shares if available[n] > 0]
    total = min([max_bytes] + reachable) if reachable else 0
    rng = random.Random(seed)
    chosen, info = {}, {}
    for name in shares:
        sizes = sizes_by_source.get(name, ())
        order = array.array("q", range(len(sizes)))
        rng.shuffle(order)  # the same permutation as shuffling the documents themselves
        budget, taken, picked = shares[name] * total, 0, array.array("q")
        for position in order:
            if taken >= budget:
                break
            picked.append(position)
            taken += int(sizes[position])
        chosen[name] = picked
        info[name] = {"target_share": shares[name], "available_bytes": available[name], "bytes": taken}
    return chosen, info


def mixture_shortfall(mixture, max_bytes):
    """A warning when the mixture (its report: bytes per source) falls short of max_bytes by more
    than 5 %, naming the source that ran out first relative to its share; None otherwise."""
    total = sum(m["bytes"] for m in mixture.values())
    if total >= 0.95 * max_bytes:
        return None
    scarce = min(mixture, key=lambda n: mixture[n]["available_bytes"] / mixture[n]["target_share"])
    return (f"the mixture has {total / 1e6:.2f} MB, less than --max-bytes: source {scarce!r} has only "
            f"{mixture[scarce]['available_bytes'] / 1e6:.2f} MB after curation")


def mix(documents_by_source, weights, max_bytes, seed=0):
    """mix_positions on in-memory documents: returns (documents, info)."""
    sizes = {name: [_nbytes(d) for d in docs] for name, docs in documents_by_source.items()}
    chosen, info = mix_positions(sizes, weights, max_bytes, seed)
    return [documents_by_source[name][p] for name in chosen for p in chosen[name]], info


def _nbytes(doc):
    return len(utf8(doc.text))
