"""Every subcommand, given a missing or empty file or directory, exits with one line, no traceback.

The table below names an argument list for each command; the test walks the real parser tree
and fails when a command has no entry, so a new command is covered from its first commit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from provisioning.cli import build_parser, main

# Placeholders: {missing} a path that does not exist, {dir} an empty directory, {file} an empty
# file, {new} a path that does not exist yet (an output).
_NODE_TLS = ["--timeout", "2", "--ca", "{P}", "--cert", "{P}", "--key", "{P}"]
CASES: dict[str, list[list[str]]] = {
    "demo": [["--work", "{file}"]],
    "bundle create": [["{P}", "--name", "m", "--version", "1.0.0", "--golden", "{P}", "--out", "{new}"]],
    "bundle create-llm": [["{P}", "--name", "m", "--version", "1.0.0", "--out", "{new}"]],
    "bundle create-embedding": [["{P}", "--name", "m", "--version", "1.0.0", "--out", "{new}"]],
    "bundle inspect": [["{P}"]],
    "bundle verify": [["{P}"]],
    "registry init": [["{file}"], ["{new}", "--passphrase-file", "{missing}"]],
    "registry add": [["{P}", "{P}"]],
    "registry publish": [["{P}"]],
    "registry rotate-key": [["{P}", "targets"]],
    "registry status": [["{P}"]],
    "registry serve": [["{P}", "--port", "0"]],
    "agent serve": [["--config", "{missing}"], ["--config", "{dir}"],  # an empty file is a config
                    ["--state-dir", "{new}", "--trusted-root", "{P}"]],
    "agent os-install": [["--state-dir", "{P}", "--trust-dir", "{P}", "--trusted-root", "{P}"]],
    "agent attest-key": [["--config", "{missing}", "--out", "{new}"],
                         ["--config", "{dir}", "--out", "{new}"]],
    "node health": [_NODE_TLS],
    "node inventory": [_NODE_TLS],
    "node events": [_NODE_TLS],
    "node update check": [_NODE_TLS],
    "node update apply": [_NODE_TLS],
    "node update rollback": [["m", "1.0.0", *_NODE_TLS]],
    "node update history": [_NODE_TLS],
    "mirror sync": [["{missing}", "--mirror", "{new}"], ["{dir}", "--mirror", "{new}"]],
    "mirror verify": [["{P}"]],
    "mirror sync-scanner": [["--mirror", "{P}"]],
    "build": [["{P}", "--mirror", "{P}", "--out", "{new}", "--dry-run"]],
    "os-release": [["{P}", "--out", "{new}"]],
    "audit": [["{missing}", "--mirror", "{P}", "--out", "{new}"],
              ["{file}", "--mirror", "{P}", "--out", "{new}"],
              ["{dir}", "--mirror", "{P}", "--out", "{new}"]],
    "audit-booted": [["{P}", "--console", "{P}"], ["{P}", "--console", "{P}", "--baseline", "{P}"]],
    "boot": [["{missing}"], ["--stop", "{P}"]],
    "flash": [["{P}", "{new}"]],
    "fleet status": [["-i", "{P}", "--insecure"]],
    "fleet health": [["-i", "{P}", "--insecure"]],
    "fleet inventory": [["-i", "{P}", "--insecure"]],
    "fleet enrol-attest": [["-i", "{P}", "--insecure", "--pki-dir", "{P}"]],
    "fleet attest": [["-i", "{P}", "--insecure", "--expect", "{P}", "--site-ca", "{P}"]],
    "fleet update": [["-i", "{P}", "--insecure"]],
    "fleet unseal": [["-i", "{P}", "--insecure", "--recovery-key", "{P}"],
                     ["-i", "{P}", "--insecure", "--recovery-key", "{P}", "--escrow", "{P}"]],
    "fleet escrow": [["-i", "{P}", "--insecure", "--out", "{new}"],
                     ["-i", "{P}", "--insecure", "--out", "{new}", "--recovery-key", "{P}"]],
    "fleet rollout": [["-i", "{P}", "--insecure", "--dry-run"],
                      ["-i", "{P}", "--insecure", "--expect", "{P}", "--site-ca", "{P}"]],
    "fleet sd": [["-i", "{P}"], ["-i", "{missing}", "--out", "{dir}"]],
    "pki init": [["--dir", "{file}"], ["--dir", "{new}", "--passphrase-file", "{missing}"]],
    "pki issue-node": [["n1", "--dir", "{P}"]],
    "pki issue-ak": [["n1", "--ak-public", "{P}", "--dir", "{P}"]],
    "pki issue-client": [["alice", "--role", "admin", "--dir", "{P}"]],
    "pki revoke": [["alice", "--dir", "{P}"]],
    "pki list": [["--dir", "{P}"]],
    "pki request": [["n1", "--key", "{dir}", "--csr", "{new}"], ["n1", "--key", "{new}", "--csr", "{dir}"]],
    "pki crl": [["--dir", "{P}"]],
    "pki recovery-key": [["{P}", "--key", "{P}"]],
}


def leaves(parser: argparse.ArgumentParser,
           prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    """Every command that runs something, by its words (``"node update apply"``)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= leaves(child, (*prefix, name))
    if not found and prefix:
        found[" ".join(prefix)] = parser
    return found


def _expand(args: list[str], tmp: Path, fill: str) -> list[str]:
    (tmp / "dir").mkdir(exist_ok=True)
    (tmp / "file").touch()
    paths = {"{missing}": tmp / "missing", "{dir}": tmp / "dir", "{file}": tmp / "file", "{new}": tmp / "new"}
    paths["{P}"] = paths[fill]
    return [str(paths.get(a, a)) for a in args]


def _runs() -> list[tuple[str, list[str], str]]:
    runs = []
    for command, variants in CASES.items():
        for args in variants:
            # {P} stands for each kind of bad path in turn.
            fills = ("{missing}", "{dir}", "{file}") if "{P}" in args else ("{missing}",)
            runs += [(command, args, fill) for fill in fills]
    return runs


def test_every_command_is_in_the_table() -> None:
    assert sorted(leaves(build_parser())) == sorted(CASES)


@pytest.mark.parametrize(("command", "args", "fill"), _runs(),
                         ids=[f"{c}-{f.strip('{}')}-{i}" for i, (c, _, f) in enumerate(_runs())])
def test_a_bad_path_is_a_one_line_error(command: str, args: list[str], fill: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    argv = [*command.split(), *_expand(args, tmp_path, fill)]
    code = main(argv)  # an exception other than SystemExit escaping here is the crash we look for
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code not in (0, 2), f"appliance {' '.join(argv)} exited {code}:\n{err}"
    lines = [ln for ln in err.splitlines() if ln.startswith("appliance: error: ")]
    assert len(lines) == 1, err
    assert not (tmp_path / "new").exists() or command in ("registry init", "pki init")


@pytest.mark.parametrize("command", sorted(CASES))
def test_json_before_and_after_the_command_agree(command: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = _expand(CASES[command][0], tmp_path, "{missing}")
    documents = []
    for argv in (["--json", *command.split(), *args], [*command.split(), *args, "--json"]):
        code = main(argv)
        out, _ = capsys.readouterr()
        documents.append((code, json.loads(out)))
    assert documents[0] == documents[1]
    assert documents[0][1]["exit_code"] == documents[0][0] != 0
