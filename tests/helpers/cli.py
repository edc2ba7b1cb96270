"""Running a tool in-process under the shared error policy, and the checks every bad-input test makes: exit code
of the error's kind, exactly one located line, no traceback, earlier outputs byte-identical."""
from __future__ import annotations

from pathlib import Path

from megatron_cslm.tool import run_tool

EARLIER = b"an earlier output that a failed run must leave alone\n"


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one in-process tool run (argparse errors exit via SystemExit)."""
    capsys.readouterr()
    try:
        code = run_tool(main, [str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_fails(result, code: int, *fragments: str) -> None:
    rc, _, err = result
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(lines) == 1, err  # one located line (argparse adds its usage above it)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def earlier(*paths: Path) -> dict[Path, bytes]:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(EARLIER + p.name.encode())
    return {p: p.read_bytes() for p in paths}


def unchanged(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} changed after a failed run"
