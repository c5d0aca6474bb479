"""The project speaks of itself only: no issue numbers, no sessions, no "who ran what when".

A reader of the README, the docs, the code, the specs, the tests or the benchmarks cannot look up an
issue number or a working session; the text says "this study", or gives a commit hash where provenance
matters. pytest's "session-scoped" fixtures are the one allowed use of the word. (The examples below are
split across string literals so that this file does not match its own pattern.)"""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCOPE = ("README.md", "docs", "src/glrnet", "tests", "benchmarks")
FORBIDDEN = re.compile(r"\bissue [0-9]+|\bsession [0-9]+"
                       r"|\b(this|that|earlier|later|previous|next|first|second|third|fourth) session\b",
                       re.IGNORECASE)
ALLOWED = re.compile(r"session-scoped|scope=.session.", re.IGNORECASE)


def files_in_scope() -> list[Path]:
    """Tracked files and new ones git does not ignore (a new page is checked before it is committed)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *SCOPE],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / p for p in sorted(set(out.splitlines()))]
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: every file under the scope
        paths = sorted(p for s in SCOPE for p in ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*")))
    return [p for p in paths if p.is_file() and p.resolve() != Path(__file__).resolve()]


def offending_lines(text: str) -> list[tuple[int, str]]:
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if FORBIDDEN.search(ALLOWED.sub("", line))]


def test_the_pattern_catches_issue_and_session_words_and_allows_session_scoped_fixtures():
    for line in ("Issue " "17's parts", "as measured in session " "12", "an earlier " "session measured 1.73×",
                 "rerun in this " "session", "fixed in issue " "3"):
        assert offending_lines(line), line
    for line in ('@pytest.fixture(scope="session")', "a session-scoped fixture", "the first session-scoped one",
                 "a user's interactive session is left as it was", "this study"):
        assert not offending_lines(line), line


def test_no_file_speaks_of_issues_or_sessions():
    hits = []
    for path in files_in_scope():
        data = path.read_bytes()
        if b"\0" in data[:4096]:          # weights, figures: not text
            continue
        rel = path.relative_to(ROOT)
        hits += [f"{rel}:{n}: {line[:160]}" for n, line in offending_lines(data.decode("utf-8", "replace"))]
    assert not hits, ("these lines speak of issues or sessions, which a reader cannot look up "
                      "(say \"this study\", or give a commit hash):\n" + "\n".join(hits))
