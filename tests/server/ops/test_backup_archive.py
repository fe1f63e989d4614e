"""Archives that must be refused, and the guards around a restore.

Each test writes a real archive with ``calejo backup`` from a database
filled through the real storage, then damages it (a digest, a row, the
end of the file, the manifest) or hands over a file that is not ours,
and checks that ``calejo verify-backup`` and ``calejo restore`` refuse it
naming the part, leaving the database as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pty
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from calejo_server.storage import open_storage
from tests.server.ops.backup_support import (
    ADMIN_PASSWORD,
    CALEJO,
    REPO,
    audit_events,
    calejo,
    config_text,
    table_rows,
)
from tests.server.storage.conftest import run, setpoint_write

MEMBER = "database/setpoints.jsonl"
AUDIT = "compliance_audit_log"


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("CALEJO_") and k != "DATABASE_URL"
    }
    env["CALEJO_DATA_DIR"] = str(data_dir)
    env["CALEJO_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    return env


def _fill(data_dir: Path) -> None:
    async def main() -> None:
        storage = open_storage(None, data_dir)
        await storage.open()
        try:
            for k in range(6):
                await storage.write(setpoint_write("north", f"p{k % 2 + 1}", 30 + k, k))
        finally:
            await storage.close()

    run(main())


class Site:
    """A data folder with a filled database, its config and one archive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.config = root / "calejo.yaml"
        self.config.write_text(config_text())
        self.env = _base_env(self.data_dir)
        _fill(self.data_dir)
        result = self.calejo("backup", "database")
        assert result.returncode == 0, result.stdout + result.stderr
        (self.archive,) = (self.data_dir / "backups" / "database").glob("*.tar.gz")

    def calejo(self, *args: str, stdin: str | None = "") -> Any:
        return calejo([*args, "--config", str(self.config)], self.env, stdin=stdin)

    def rows(self) -> dict[str, list[tuple[Any, ...]]]:
        return table_rows(None, self.data_dir)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def _write(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def _edit_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    members = _members(path)
    manifest = json.loads(members[0][1])
    change(manifest)
    members[0] = (members[0][0], json.dumps(manifest).encode())
    _write(path, members)


def _refused(site: Site, part: str, words: str, path: Path | None = None) -> None:
    """verify-backup and restore both refuse, naming ``part``; nothing changes."""
    archive = str(path or site.archive)
    before = site.rows()

    verify = site.calejo("verify-backup", archive)
    assert verify.returncode == 1, verify.stdout + verify.stderr
    assert f"FAILED {part}: " in verify.stdout, verify.stdout
    assert words in verify.stdout, verify.stdout
    assert f"backup verification failed: {part}: " in verify.stdout

    restore = site.calejo("restore", "database", archive, "--yes")
    assert restore.returncode == 1, restore.stdout + restore.stderr
    assert f"restore refused: the archive failed verification: {part}: " in (
        restore.stderr
    )
    assert "Traceback" not in restore.stderr + verify.stderr
    after = site.rows()
    for name in before:
        if name not in (AUDIT, "audit_chain_head"):
            assert after[name] == before[name], name
    old = sorted(before[AUDIT], key=lambda r: r[0])
    new = sorted(after[AUDIT], key=lambda r: r[0])
    assert new[: len(old)] == old
    assert set(audit_events(new[len(old) :])) == {"BACKUP_VERIFICATION_FAILED"}


def test_verify_backup_checks_each_part_and_is_audited(site: Site) -> None:
    result = site.calejo("verify-backup", str(site.archive))

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("ok ") for line in lines[:-1]), result.stdout
    names = {line.split()[1].rstrip(":") for line in lines[:-1]}
    assert {"manifest", MEMBER, "database/users.jsonl", "rows", "audit"} <= names
    assert "audit chain: 6 rows verified" in result.stdout
    assert lines[-1] == f"backup verified: {site.archive}"

    export = site.calejo("audit", "export", "--format", "json")
    events = [(r["event_type"], r["user"]) for r in json.loads(export.stdout)]
    user = events[-1][1]
    assert user.startswith("cli:")
    assert events[-3:] == [
        ("BACKUP_CREATED", user),
        ("BACKUP_VERIFIED", user),
        ("BACKUP_VERIFIED", user),
    ]


def test_tampered_digest_is_refused_naming_the_part(site: Site) -> None:
    def change(manifest: dict[str, Any]) -> None:
        for content in manifest["contents"]:
            if content["path"] == MEMBER:
                content["sha256"] = "0" * 64

    _edit_manifest(site.archive, change)

    _refused(site, MEMBER, "sha256 mismatch")


def test_altered_row_with_a_matching_digest_breaks_the_audit_chain(
    site: Site,
) -> None:
    members = _members(site.archive)
    manifest = json.loads(members[0][1])
    name = "database/compliance_audit_log.jsonl"
    index = next(i for i, (m, _) in enumerate(members) if m.name == name)
    lines = members[index][1].decode().splitlines(keepends=True)
    lines[2] = lines[2].replace('"32.0"', '"52.0"')
    data = "".join(lines).encode()
    members[index] = (members[index][0], data)
    for content in manifest["contents"]:
        if content["path"] == name:
            content["sha256"] = hashlib.sha256(data).hexdigest()
            content["size"] = len(data)
    members[0] = (members[0][0], json.dumps(manifest).encode())
    _write(site.archive, members)

    _refused(site, "audit chain", "row 3: content changed after it was written")


@pytest.mark.parametrize("keep", [0.97, 0.5, 0.1])
def test_truncated_archive_is_refused_naming_the_part(site: Site, keep: float) -> None:
    data = site.archive.read_bytes()
    short = site.archive.with_name("short.tar.gz")
    short.write_bytes(data[: int(len(data) * keep)])

    verify = site.calejo("verify-backup", str(short))

    assert verify.returncode == 1
    failed = [line for line in verify.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, verify.stdout
    part = failed[0].split()[1].rstrip(":")
    assert part in ("manifest.json", "archive") or part.startswith("database/"), failed
    assert "truncated" in failed[0], failed
    _refused(site, part, "truncated", short)


def _zip(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", "{}")


def _other_tar(path: Path) -> None:
    _write(path, [(tarfile.TarInfo("notes.txt"), b"shopping list\n")])


def _plain_gzip(path: Path) -> None:
    path.write_bytes(gzip.compress(b"log line\n" * 100))


@pytest.mark.parametrize(
    ("make", "part", "words"),
    [
        (
            _zip,
            "archive",
            "not a calejo backup: expected a gzip-compressed tar "
            "archive, got a zip file",
        ),
        (lambda p: p.write_text("hello\n"), "archive", "not a calejo backup"),
        (lambda p: p.write_bytes(b""), "archive", "is empty"),
        (_other_tar, "manifest.json", "the first member is 'notes.txt'"),
        (_plain_gzip, "archive", "does not hold a tar archive"),
    ],
    ids=["zip", "text", "empty", "other-tar", "plain-gzip"],
)
def test_foreign_file_is_refused(
    site: Site, make: Callable[[Path], None], part: str, words: str
) -> None:
    foreign = site.root / "foreign.tar.gz"
    make(foreign)

    _refused(site, part, words, foreign)


def test_other_format_or_a_foreign_manifest_is_refused(site: Site) -> None:
    newer = site.root / "newer.tar.gz"
    newer.write_bytes(site.archive.read_bytes())
    _edit_manifest(newer, lambda m: m.update(format_version=2))
    _refused(
        site,
        "manifest.json",
        "archive format version 2 is newer than this adapter reads (version 1)",
        newer,
    )

    foreign = site.root / "foreign.tar.gz"
    foreign.write_bytes(site.archive.read_bytes())
    _edit_manifest(foreign, lambda m: m.update(format="someone-elses-backup"))
    _refused(site, "manifest.json", "not a calejo backup: expected format", foreign)


def test_archive_from_a_newer_schema_is_refused(site: Site) -> None:
    _edit_manifest(site.archive, lambda m: m["database"].update(schema_version=99))

    _refused(site, "database", "schema version 99 is newer than this adapter knows")


def test_restore_without_yes_on_a_pipe_is_refused(site: Site) -> None:
    before = site.rows()

    result = site.calejo("restore", "database", str(site.archive), stdin="yes\n")

    assert result.returncode == 2
    assert "standard input is not a terminal" in result.stderr
    assert "--yes" in result.stderr
    assert site.rows() == before


def test_restore_while_an_adapter_runs_is_refused(
    site: Site, adapter_factory: Callable[..., Any]
) -> None:
    adapter = adapter_factory(
        config=config_text(),
        env={"CALEJO_ADMIN_PASSWORD": ADMIN_PASSWORD},
        data_dir=site.data_dir,
    )

    result = site.calejo("restore", "database", str(site.archive), "--yes")

    assert result.returncode == 1
    assert f"another adapter is running on data folder {site.data_dir}" in (
        result.stderr
    )
    assert f"(pid {adapter.process.pid})" in result.stderr
    assert "stop it before restoring" in result.stderr
    assert adapter.stop() == 0


def _on_terminal(site: Site, answer: str) -> tuple[int, str]:
    """Run ``calejo restore`` with a terminal as standard input; type ``answer``."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            [
                str(CALEJO),
                "restore",
                "database",
                str(site.archive),
                "--config",
                str(site.config),
            ],
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=site.env,
            cwd=REPO,
        )
        os.write(leader, answer.encode() + b"\n")
        output, _ = process.communicate(timeout=120)
        return process.returncode, output.decode()
    finally:
        os.close(leader)
        os.close(follower)


def test_restore_on_a_terminal_asks_for_yes(site: Site) -> None:
    before = site.rows()

    code, output = _on_terminal(site, "no")
    assert code == 1, output
    assert "Type yes to restore: " in output
    assert "restore cancelled: expected 'yes', got 'no'" in output
    assert site.rows() == before

    code, output = _on_terminal(site, "yes")
    assert code == 0, output
    assert "database restored: " in output


def test_config_restore_brings_back_files_and_their_modes(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    trusted = tmp_path / "trusted"
    certs.mkdir(mode=0o700)
    trusted.mkdir()
    (certs / "ca.crt").write_text("certificate\n")
    (certs / "ca.key").write_text("private key\n")
    os.chmod(certs / "ca.crt", 0o644)
    os.chmod(certs / "ca.key", 0o600)
    os.chmod(certs, 0o700)
    (trusted / "scada").mkdir()
    (trusted / "scada" / "client.der").write_bytes(b"\x30\x82client")
    config = tmp_path / "calejo.yaml"
    config.write_text(
        config_text(
            certificates={"dir": str(certs)},
            opcua={"enabled": False, "trust_dir": str(trusted)},
        )
    )
    env = _base_env(tmp_path / "data")
    _fill(tmp_path / "data")
    original = config.read_text()

    made = calejo(["backup", "config", "--config", str(config)], env)
    assert made.returncode == 0, made.stdout + made.stderr
    (archive,) = (tmp_path / "data" / "backups" / "config").glob("*.tar.gz")
    (certs / "ca.key").write_text("a key that replaced the right one\n")
    (certs / "stray.pem").write_text("stray\n")
    (trusted / "scada" / "client.der").unlink()
    config.write_text(original + "# changed\n")

    restored = calejo(
        ["restore", "config", str(archive), "--yes", "--config", str(config)], env
    )

    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert config.read_text() == original
    assert (certs / "ca.key").read_text() == "private key\n"
    assert (certs / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (certs / "ca.crt").stat().st_mode & 0o777 == 0o644
    assert certs.stat().st_mode & 0o777 == 0o700
    assert not (certs / "stray.pem").exists()
    assert (tmp_path / "certs.before-restore" / "stray.pem").exists()
    assert (trusted / "scada" / "client.der").read_bytes() == b"\x30\x82client"
    export = calejo(
        ["audit", "export", "--format", "json", "--config", str(config)], env
    )
    last = json.loads(export.stdout)[-1]
    assert last["event_type"] == "RESTORE_COMPLETED"
    assert last["details"]["folders"] == {
        "certificates": str(certs),
        "opcua_trusted": str(trusted),
    }


def test_demonstration_configuration_has_nothing_to_back_up_as_config(
    tmp_path: Path,
) -> None:
    env = _base_env(tmp_path / "data")
    _fill(tmp_path / "data")

    result = calejo(["backup", "config"], env)

    assert result.returncode == 1
    assert "no configuration file in use" in result.stderr
