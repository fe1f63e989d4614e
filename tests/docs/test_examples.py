"""Every Python example in the documentation runs and prints what it shows.

The examples are the ```python blocks of README.md and of every Markdown
file under docs/. The conventions, which the documentation follows:

- Each ```python block stands alone: it runs in a fresh module namespace
  and may not rely on names defined by another block.
- When a block prints, the ```text block that directly follows it (with
  nothing but blank lines between the two fences) is its exact output. The
  test compares them, ignoring spaces at line ends and blank lines at the
  end. A block that prints with no ```text block after it fails, and so
  does one whose ```text block differs from what it printed. Comments in
  the code may explain a value; the ```text block is what is checked.
- A block whose fence comes right after a line ``<!-- not run -->`` (blank
  lines between are allowed) is compiled but not run. It is meant only for
  examples that need a live server.
- A block runs for at most BLOCK_TIMEOUT seconds.

Line numbers in tracebacks are those of the Markdown file.
"""

from __future__ import annotations

import contextlib
import io
import re
import signal
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCK_TIMEOUT = 30.0
NOT_RUN = "<!-- not run -->"
MODULE_NAME = "calejo_doc_example"

FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    run: bool
    expected: str | None

    @property
    def origin(self) -> str:
        shown = (
            self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        )
        return f"{shown.as_posix()}:{self.line}"


def parse(path: Path) -> list[Block]:
    """The fenced blocks of ``path``, in order.

    A python block's ``expected`` is the text of the ```text block that
    directly follows it, or None.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[tuple[int, int, str, str, bool]] = []
    index = 0

    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue

        start = index
        index += 1
        while index < len(lines) and lines[index].rstrip() != "```":
            index += 1
        if index == len(lines):
            raise ValueError(
                f"{path}:{start + 1}: expected a closing ``` for this fence, "
                "got the end of the file"
            )

        earlier = [text.strip() for text in lines[:start] if text.strip()]
        skip = bool(earlier) and earlier[-1] == NOT_RUN
        code = "\n".join(lines[start + 1 : index]) + "\n"
        found.append((start, index, opening["language"], code, not skip))
        index += 1

    blocks = []
    for position, (start, end, language, code, run) in enumerate(found):
        expected = None
        if language == "python" and position + 1 < len(found):
            next_start, _, next_language, next_code, _ = found[position + 1]
            between = lines[end + 1 : next_start]
            if next_language == "text" and not any(text.strip() for text in between):
                expected = next_code
        blocks.append(Block(path, start + 1, language, code, run, expected))
    return blocks


def documents() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks() -> list[Block]:
    return [
        block
        for path in documents()
        for block in parse(path)
        if block.language == "python"
    ]


@contextlib.contextmanager
def time_limit(seconds: float, origin: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds``."""

    def expire(signum: int, frame: types.FrameType | None) -> None:
        raise TimeoutError(f"{origin}: the example ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        signal.signal(signal.SIGALRM, previous)


def compiled(block: Block) -> types.CodeType:
    """The block's code, its lines numbered as in its file."""
    padded = "\n" * block.line + block.code
    code: types.CodeType = compile(padded, str(block.path), "exec")
    return code


def execute(block: Block, timeout: float) -> str:
    """Run the block in a fresh module; return what it printed."""
    module = types.ModuleType(MODULE_NAME)
    module.__file__ = str(block.path)
    output = io.StringIO()
    code = compiled(block)

    sys.modules[MODULE_NAME] = module
    try:
        with (
            contextlib.redirect_stdout(output),
            time_limit(timeout, block.origin),
        ):
            exec(code, module.__dict__)
    finally:
        del sys.modules[MODULE_NAME]
    return output.getvalue()


def normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def check(block: Block, timeout: float = BLOCK_TIMEOUT) -> None:
    """Run (or, opted out, compile) the block and compare its output."""
    if not block.run:
        compiled(block)
        return

    printed = normalized(execute(block, timeout))
    if block.expected is None:
        assert not printed, (
            f"{block.origin}: the example printed\n{printed}\n"
            "but no ```text block follows it"
        )
        return

    expected = normalized(block.expected)
    assert printed == expected, (
        f"{block.origin}: the example printed\n{printed}\n"
        f"but the ```text block after it says\n{expected}"
    )


BLOCKS = python_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[block.origin for block in BLOCKS])
def test_example(block: Block) -> None:
    check(block)


def test_the_core_guide_and_the_readme_have_examples_that_run() -> None:
    by_file: dict[str, list[Block]] = {}
    for block in BLOCKS:
        by_file.setdefault(block.path.name, []).append(block)

    assert any(block.run for block in by_file["README.md"])
    core = [block for block in by_file["core.md"] if block.run]
    assert len(core) >= 10
    assert sum(block.expected is not None for block in core) >= 5


# The conventions themselves, on small documents.

SAMPLE = """\
# Sample

```python
print("one")
```

```text
one
```

```python
x = 2
```

Some prose.

```text
not an output
```

<!-- not run -->

```python
import nothing_by_this_name
```
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sample.md"
    path.write_text(text, encoding="utf-8")
    return path


def test_parse_pairs_outputs_and_opt_outs(tmp_path: Path) -> None:
    blocks = parse(write(tmp_path, SAMPLE))

    assert [(b.line, b.language, b.run) for b in blocks] == [
        (3, "python", True),
        (7, "text", True),
        (11, "python", True),
        (17, "text", True),
        (23, "python", False),
    ]
    assert blocks[0].code == 'print("one")\n'
    assert blocks[0].expected == "one\n"
    assert blocks[2].expected is None
    assert blocks[4].expected is None


def test_parse_refuses_an_unclosed_fence(tmp_path: Path) -> None:
    path = write(tmp_path, "text\n\n```python\nprint(1)\n")

    with pytest.raises(ValueError, match=r"sample\.md:3: expected a closing ```"):
        parse(path)


def sample_block(tmp_path: Path, code: str, expected: str | None) -> Block:
    path = tmp_path / "sample.md"
    return Block(path, 1, "python", code, True, expected)


def test_check_compares_output(tmp_path: Path) -> None:
    check(sample_block(tmp_path, "print('a ')\nprint('b')\n", "a\nb\n\n"))
    check(sample_block(tmp_path, "x = 1\n", None))

    with pytest.raises(AssertionError, match="but the ```text block after it says"):
        check(sample_block(tmp_path, "print('a')\n", "b\n"))
    with pytest.raises(AssertionError, match="no ```text block follows it"):
        check(sample_block(tmp_path, "print('a')\n", None))
    with pytest.raises(AssertionError, match="but the ```text block after it says"):
        check(sample_block(tmp_path, "x = 1\n", "1\n"))


def test_check_reports_errors_at_the_document_line(tmp_path: Path) -> None:
    block = Block(tmp_path / "sample.md", 40, "python", "x = 1\n1 / 0\n", True, None)

    with pytest.raises(ZeroDivisionError) as raised:
        check(block)

    assert raised.traceback[-1].lineno + 1 == 42
    assert MODULE_NAME not in sys.modules


def test_check_bounds_the_run_time(tmp_path: Path) -> None:
    block = sample_block(tmp_path, "while True:\n    pass\n", None)

    with pytest.raises(TimeoutError, match=r"ran for more than 0\.2 s"):
        check(block, timeout=0.2)
