"""The command line against its documentation, through the installed `strata` entry point: every `strata ...`
command shown in README.md and docs/*.md (code blocks and inline code) answers `--help`, and every flag the
docs give it is in that help. Also: a misspelled flag is named (with the closest one) in a short error, and
`strata generate --help` describes itself and shows defaults."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# `strata` where a shell command starts: line start (after an optional `$ ` prompt), after && | ; or $(, and
# after environment assignments (RANK=3 WORLD_SIZE=4 strata batch ...).
COMMAND = re.compile(r"(?:^|&&|\|\||[|;]|\$\()\s*(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
                     r"strata\s+(?=[a-z][a-z0-9-]*(?:\s|$))(.*)")
FLAG = re.compile(r"^\[?(--[a-z][a-z0-9-]*)")
WORD = re.compile(r"^[a-z][a-z0-9-]*$")
NESTED = re.compile(r"(?<!\[)(?:\{[\w,-]+\}|\b[A-Z]+) \.\.\.")   # argparse's usage of a subcommand argument


def code_texts(path: Path):
    """(line number, text) of each code line (continuations joined) and each inline code span."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fence, lang, i = False, "", 0
    while i < len(lines):
        line, no = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence, lang = not fence, line.strip()[3:].strip()
        elif fence:
            if lang not in ("python", "yaml", "json"):
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                yield no, line
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield no, span
        i += 1


def invocations():
    """[(where, words after `strata`, flags)] for every documented strata command."""
    out = []
    for path in DOCS:
        for no, text in code_texts(path):
            for m in COMMAND.finditer(text):
                rest = re.split(r"\s#|\s>|\s\|\s|;|&&", m.group(1))[0]
                try:
                    tokens = shlex.split(rest)
                except ValueError:
                    tokens = rest.split()
                flags = {f.group(1) for t in tokens if " " not in t and (f := FLAG.match(t))}
                out.append((f"{path.relative_to(ROOT)}:{no}", tokens, flags))
    return out


def strata_help(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["strata", *argv, "--help"], capture_output=True, text=True, timeout=120)


def check(invs) -> list[str]:
    """Problems with the documented invocations: commands without --help, flags missing from it."""
    helps: dict[tuple, subprocess.CompletedProcess] = {}

    def run_all(cmds):
        cmds = [c for c in dict.fromkeys(cmds) if c not in helps]
        with ThreadPoolExecutor(4) as pool:   # one process per distinct command
            for c, r in zip(cmds, pool.map(lambda c: strata_help(list(c)), cmds)):
                helps[c] = r

    run_all((words[0],) for _, words, _ in invs)
    commands = []
    for where, words, flags in invs:
        cmd = (words[0],)
        first = helps[cmd]
        usage = first.stdout.split("\n\n")[0]
        if first.returncode == 0 and NESTED.search(usage) and len(words) > 1 and WORD.match(words[1]):
            cmd = (words[0], words[1])   # a subcommand of a command that has them (strata slurm serve)
        commands.append((where, cmd, flags))
    run_all(cmd for _, cmd, _ in commands)
    problems = []
    for where, cmd, flags in commands:
        r = helps[cmd]
        name = "strata " + " ".join(cmd)
        if r.returncode != 0:
            problems.append(f"{where}: `{name} --help` failed ({r.returncode}): {r.stderr.strip()[-300:]}")
            continue
        for f in sorted(flags):
            if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", r.stdout):
                problems.append(f"{where}: `{name}` has no flag {f}")
    return problems


def test_documented_commands_and_flags_exist():
    invs = invocations()
    found = {tuple(w[:2]) for _, w, _ in invs}
    # the extraction itself works: these are shown in the docs
    assert {("slurm", "serve"), ("slurm", "batch"), ("router", "status"), ("bench", "throughput")} <= found
    assert any(w[0] == "chat" for _, w, _ in invs)
    problems = check(invs)
    assert not problems, "docs and CLI disagree:\n" + "\n".join(problems)


def test_drift_is_caught(tmp_path, monkeypatch):
    """The checker reports a command that does not exist and a flag a command does not have."""
    doc = tmp_path / "X.md"
    doc.write_text("```bash\nstrata slurm nosuch --nodes 2\nstrata generate --prompt hi --no-such-flag 1\n```\n"
                   "and inline `strata router status --router http://x --jsn`.\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [doc])
    problems = check(invocations())
    assert len(problems) == 3, problems
    assert "X.md:2: `strata slurm nosuch --help` failed" in problems[0] and "invalid choice" in problems[0]
    assert problems[1] == "X.md:3: `strata generate` has no flag --no-such-flag"
    assert problems[2] == "X.md:5: `strata router status` has no flag --jsn"


@pytest.mark.parametrize("argv, flag, close", [
    (["batch", "--text-feild", "body"], "--text-feild", "--text-field"),
    (["slurm", "serve", "--router", "http://r:9000", "--replcas-per-node", "2"], "--replcas-per-node",
     "--replicas-per-node"),
    (["generate", "--max-tokns=5"], "--max-tokns", "--max-tokens"),
])
def test_unknown_flag_is_named(argv, flag, close):
    r = subprocess.run(["strata", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert f"error: unknown flag {flag} (did you mean {close}?)" in r.stderr
    assert "invalid choice" not in r.stderr and len(r.stderr.splitlines()) <= 4, r.stderr


def test_generate_help_describes_and_shows_defaults():
    out = strata_help(["generate"]).stdout
    description = out.split("\n\n")[1]
    assert description.startswith("Generate text") and "\n" not in description.strip()
    assert "(default: 128)" in out          # --max-tokens
    assert "(default: 0.9)" in out          # --gpu-memory-utilization, an engine flag
