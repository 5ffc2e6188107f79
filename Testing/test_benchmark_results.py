"""benchmarks/results/CURRENT.md backs every measured figure of the top-level README with a committed raw file.

(a) every raw file CURRENT.md names exists; (b) every number-like figure of the README (speedups, times,
sizes, memory, percentages, Dice/agreement values, the numbers of its measurement tables) appears in
CURRENT.md's first column, unless the short allow-list below says why it is not a measurement of this
project; (c) every result path cited by benchmarks/README.md, README.md, results/README.md and docs/*.md exists
(older rounds live in results/archive/); (d) every speedup of CURRENT.md's "how it follows" column appears in
its raw files or is the quotient of two numbers that do; (e) no raw file is git-ignored (a clone would lack it).
A new measured number in the README without a CURRENT.md row fails (b).
"""
from __future__ import annotations

import itertools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
CURRENT = RESULTS / "CURRENT.md"
BENCHMARKS_README = ROOT / "benchmarks" / "README.md"

# README numbers that are not this project's measurements, each with the reason.
NOT_MEASUREMENTS = {
    # the paper's figures (Qu et al. 2025), quoted as the paper's, not reproduced here
    "2.4-3.9x": "paper", "2.0-2.7x": "paper", "0.006": "paper",
    "14M": "paper (STU-Net sizes)", "58M": "paper (STU-Net sizes)", "440M": "paper (STU-Net sizes)",
    "1.4B": "paper (STU-Net sizes)",
    # download and install sizes of third-party packages (what pip fetches), not benchmark results
    "80 MB": "package size", "400 MB": "package size", "270 MB": "package size", "1 GB": "package size",
    "1.9 GB": "install size", "0.75 GB": "install size", "2.6 GB": "install size", "0.24 GB": "install size",
    "200 MB": "package size", "2.5 GB": "package size", "45 MB": "package size", "420 MB": "package size",
    "1.1 GB": "package size",
    # settings, thresholds and targets
    # (numbers after >, <, >=, <= or "at least" are thresholds and are skipped by figures() itself)
    "1.5x": "target", "256 MB": "logits cap per engine call", "0.01": "CI threshold (Dice within 0.01)",
    "0.95": "advice threshold (agreement well below 0.95)", "8-12 GB": "GPU card sizes (hardware)",
    "8.6": "TensorRT version",
}

NUMBER = r"\d+(?:\.\d+)?"
RANGE = rf"{NUMBER}(?:\s?[-–]\s?{NUMBER})?"
UNIT = r"(?:x|×|s|ms|MB|GB|GiB|%|M|B)"
# "6.2 instead of 12.1 GB", "2.2 -> 1.1 s", "1.42 / 0.41 MB", "from 1.31 to 0.81 s": every number gets the unit
CHAIN = re.compile(rf"(?<![\w.]){RANGE}(?:\s*(?:/|->|→|to|instead of)\s*{RANGE})*\s?{UNIT}(?![\w])")
BARE_DICE = re.compile(r"(?<![\w.])0\.\d{3,}(?!\w|\.\d)")  # agreement / Dice values (0.998, 0.9976)
TABLE_NUMBER = re.compile(r"(?<![\w.])(?:\d+\.\d+(?:\s?[-–]\s?\d+\.\d+)?|\d(?:\.\d+)?e-\d+)(?!\w|\.\d)")
THRESHOLD = re.compile(r"(?<!-)[≥≤<>]\s*$|at least\s*$")


def _normalize(token: str) -> str:
    return re.sub(r"\s+", "", token.replace("–", "-").replace("×", "x"))


def _strip_code(text: str) -> str:
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # command lines and spec examples
    return re.sub(r"`[^`\n]*`", "", text)  # option values, file names, test ids


def figures(text: str) -> set[str]:
    """Number-like figures of Markdown text, normalized ("1.42 / 0.41 MB" -> {"1.42MB", "0.41MB"})."""
    found: set[str] = set()
    blocks, prose = [], []  # table rows one by one; prose joined, so "6.2 instead of\n12.1 GB" stays one chain
    for line in _strip_code(text).splitlines() + [""]:
        if line.lstrip().startswith("|") or not line.strip():
            blocks += [" ".join(prose)] if prose else []
            prose = []
            blocks += [line] if line.strip() else []
        else:
            prose.append(line.strip())
    for line in blocks:
        spans = []
        for match in CHAIN.finditer(line):
            if THRESHOLD.search(line[:match.start()]):
                continue
            unit = re.search(rf"{UNIT}$", match.group(0)).group(0)
            for number in re.findall(RANGE, match.group(0)):
                found.add(_normalize(number + unit))
            spans.append(match.span())
        extra = [BARE_DICE] + ([TABLE_NUMBER] if line.lstrip().startswith("|") else [])
        for pattern in extra:
            for match in pattern.finditer(line):
                if any(a <= match.start() < b for a, b in spans) or THRESHOLD.search(line[:match.start()]):
                    continue
                found.add(_normalize(match.group(0)))
    return found


def current_rows() -> list[list[str]]:
    """CURRENT.md's table rows (figure, what, raw files), header and separator left out."""
    rows = []
    for line in CURRENT.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("figure as the README states it",) or set(cells[0]) <= {"-", " "}:
            continue
        rows.append(cells)
    return rows


def expand(pattern: str) -> list[str]:
    """Shell-style braces ({a,b}) of a cited path; globs are resolved by the caller."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def missing_in_current(readme_text: str, current_first_column: str) -> set[str]:
    allowed = {_normalize(k) for k in NOT_MEASUREMENTS}
    return figures(readme_text) - figures(current_first_column) - allowed


def test_current_names_raw_files_that_exist():
    rows = current_rows()
    assert len(rows) >= 40, "CURRENT.md table not found or nearly empty"
    missing = []
    for figure, *_, files in rows:
        paths = re.findall(r"`([^`]+)`", files)
        assert paths, f"row '{figure}' names no raw file"
        for path in paths:
            for one in expand(path):
                if not any(ROOT.glob(one)):
                    missing.append(one)
    assert not missing, f"CURRENT.md names files that do not exist: {missing}"


def test_every_measured_readme_number_has_a_current_row():
    readme = README.read_text(encoding="utf-8")
    first_column = "\n".join(f"| {row[0]} |" for row in current_rows())  # read as table cells
    assert len(figures(readme)) >= 150, "the README figure extraction found almost nothing: regex broken?"
    stale = {k for k in NOT_MEASUREMENTS if _normalize(k) not in figures(readme)}
    assert not stale, f"allow-list entries no longer in the README (remove them): {sorted(stale)}"
    missing = missing_in_current(readme, first_column)
    assert not missing, (f"README figures without a row in {CURRENT.relative_to(ROOT)} (add a row with the raw "
                         f"file behind each, or an allow-list entry if it is not a measurement): {sorted(missing)}")


def test_a_new_readme_number_without_a_row_fails():
    """The check is real: a figure added to the README (prose or table) is reported until CURRENT.md has it."""
    readme = README.read_text(encoding="utf-8")
    first_column = "\n".join(f"| {row[0]} |" for row in current_rows())  # read as table cells
    added = readme + ("\nOn a laptop INT8 took 12.34 ms, 3.21x faster, 0.9871 agreement; 1.11 -> 2.22 GiB.\n"
                      "| x | 9.87 / 6.54 |\n")
    before = missing_in_current(readme, first_column)  # empty unless the test above fails too
    assert missing_in_current(added, first_column) - before == {"12.34ms", "3.21x", "0.9871", "1.11GiB",
                                                                 "2.22GiB", "9.87", "6.54"}
    assert "12.34ms" not in missing_in_current(added, first_column + "\n12.34 ms")


def test_figure_extraction():
    assert figures("INT8 2.57-2.73x FP32, 6.2 instead of 12.1 GB (21 instead of 23 s), agreement 0.9976") == {
        "2.57-2.73x", "6.2GB", "12.1GB", "21s", "23s", "0.9976"}
    assert figures("from 1.31 to 0.81 s; 1.42 / 0.41 MB; 4.85 -> 4.70 ms") == {
        "1.31s", "0.81s", "1.42MB", "0.41MB", "4.85ms", "4.70ms"}
    # thresholds, options and code are not figures; table cells are
    assert figures("agreement ≥ 0.98, at least 0.9 of voxels, `--min-agreement 0.99`, Python 3.12") == set()
    assert figures("| 0.54 | 1.02 | 1e-05 |") == {"0.54", "1.02", "1e-05"}


def test_benchmarks_readme_cites_existing_result_files():
    text = BENCHMARKS_README.read_text(encoding="utf-8")
    cited = set(re.findall(r"`((?:results/)?(?:archive/)?(?:xeon-16core-amx|local-2core|epyc-2core-avx2|archive)"
                           r"/[^`\s]+)`", text))
    cited |= set(re.findall(r"`(results/[^`\s]+)`", text))
    assert len(cited) >= 30, "no result paths found in benchmarks/README.md"
    for other in (README, RESULTS / "README.md", ROOT / "docs"):  # the README, the results index, docs/*.md
        for path in ([other] if other.is_file() else sorted(other.glob("*.md"))):
            cited |= set(re.findall(r"benchmarks/(results/[\w./{},*-]+\.(?:md|json))", path.read_text(encoding="utf-8")))
    missing = []
    for path in sorted(cited):
        path = path.removeprefix("results/")
        if "..." in path or "<" in path:  # placeholders in prose ("results/<machine>/")
            continue
        for one in expand(path):
            if not any(RESULTS.glob(one)):
                missing.append(one)
    assert not missing, f"benchmarks/README.md cites result files that do not exist: {missing}"


RATIO = re.compile(r"(?<![\w.])(\d+\.\d+)x")
PLAIN_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*x\b)(?!\.\d)")


def unbacked_ratios(how: str, raw_text: str) -> list[str]:
    """Speedups ("1.63x") of a row's "how it follows" column that its raw files do not back: each must appear
    in the files as written, or be the quotient of the two numbers just before it ("173.1/106.5 = 1.63x"),
    both of which appear in the files."""
    def in_raw(number: str) -> bool:
        return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", raw_text) is not None

    unbacked = []
    for match in RATIO.finditer(how):
        if in_raw(match.group(0)):
            continue
        clause = re.split(r"[;:]", how[:match.start()])[-1]
        numbers = [n for n in PLAIN_NUMBER.findall(clause) if not n.isdigit() or len(n) > 1]
        if len(numbers) >= 2:
            a, b = numbers[-2:]
            if in_raw(a) and in_raw(b) and abs(float(a) / float(b) - float(match.group(1))) <= 0.006:
                continue
        unbacked.append(match.group(0))
    return unbacked


def _raw_text(files_cell: str) -> str:
    paths = [p for pattern in re.findall(r"`([^`]+)`", files_cell) for one in expand(pattern) for p in ROOT.glob(one)]
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def test_every_speedup_of_current_md_is_in_its_raw_files():
    """CURRENT.md's derivations are checked against the files it names, not only its file names."""
    checked, unbacked = 0, {}
    for figure, _what, how, files in current_rows():
        missing = unbacked_ratios(how, _raw_text(files))
        checked += len(RATIO.findall(how))
        if missing:
            unbacked[figure] = missing
    assert checked >= 50, "no speedups found in CURRENT.md's third column: table layout changed?"
    assert not unbacked, f"CURRENT.md speedups that neither appear in nor follow from their raw files: {unbacked}"


def test_unbacked_ratio_check_is_real():
    raw = "| unet_in | fp32sub | 173.1 |\n| unet_in | u8sub | 106.5 | 1.90x |"
    assert unbacked_ratios("medians 173.1/106.5 = 1.63x; column: 1.90x", raw) == []
    assert unbacked_ratios("medians 173.1/106.5 = 1.73x", raw) == ["1.73x"]  # wrong quotient
    assert unbacked_ratios("medians 173.1/101.5 = 1.71x", raw) == ["1.71x"]  # a number not in the file
    assert unbacked_ratios("column: 1.95x", raw) == ["1.95x"]
    assert unbacked_ratios("column: 0.90x", "| 10.90x |") == ["0.90x"]  # a whole number, not a tail


def test_raw_files_are_not_git_ignored():
    """A raw file under an ignored path would exist here but never reach a clone."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = sorted({str(p.relative_to(ROOT)) for *_, files in current_rows()
                    for pattern in re.findall(r"`([^`]+)`", files) for one in expand(pattern) for p in ROOT.glob(one)})
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode in (0, 1), result.stderr
    assert not result.stdout.strip(), f"CURRENT.md names git-ignored raw files: {result.stdout.split()}"
