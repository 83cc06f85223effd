"""The SSH transport against real OpenSSH sshd instances (the sim lab)."""

from __future__ import annotations

import logging
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from labs.errors import CommandTimeout, SSHError
from labs.inventory.models import Host, HostKeyPolicy
from labs.session import LabSession, open_inventory
from labs.simlab import keys
from labs.simlab.sshd import SimSshd
from labs.transport import CommandFailed, ConnectionLost, HostConnection, HostKeyError
from tests.conftest import HANG_S


def fresh_connection(session: LabSession, host: str, **changes: object) -> HostConnection:
    spec = session.inventory.host(host).spec.model_copy(update=changes)
    return HostConnection(host, spec, connect_timeout=5)


def test_run_returns_status_output_and_duration(sim_session: LabSession) -> None:
    result = sim_session.ssh("hostA").run("echo out; echo err >&2; exit 3")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert result.duration > 0
    with pytest.raises(CommandFailed, match="exit 3"):
        result.check()


def test_output_behind_the_exit_status_is_read_to_the_channels_eof(
    sim_session: LabSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd sends the exit status when the command ends, the rest of its output may come after it (the pipe still
    holds it; on a TCG host 2-3 % of short commands lost lines): here a child writes 0.5 s after its shell exits."""
    ssh = sim_session.ssh("hostA")
    result = ssh.run("(sleep 0.5; echo late; echo late-err >&2) & echo early")
    assert (result.stdout, result.stderr) == ("early\nlate\n", "late-err\n")
    # a child that keeps stdout open past the grace: the output so far, not a wait for the child
    monkeypatch.setattr("labs.transport.ssh.EOF_GRACE", 0.5)
    start = time.monotonic()
    result = ssh.run("(sleep 5; echo never) & echo early")
    assert result.stdout == "early\n" and time.monotonic() - start < 4


def test_a_connection_never_starts_a_key_exchange_of_its_own(
    sim_session: LabSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Old behaviour: paramiko rekeyed every 2**29 bytes, and a channel closing while that exchange was under way
    deadlocked its thread for 30 s and ended the connection with every agent on it ("Key-exchange timed out
    waiting for key negotiation": a 1 GiB device save and a raw copy after it, on one connection, 4 of 4)."""
    ssh = sim_session.ssh("hostA")
    size = (1 << 29) + (8 << 20)
    caplog.set_level(logging.DEBUG, logger="paramiko.transport")
    chan = ssh.exec_channel(f"head -c {size} /dev/zero")
    got = 0
    while data := chan.recv(1 << 20):
        got += len(data)
    assert (got, chan.recv_exit_status()) == (size, 0)
    chan.close()
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("Rekeying")] == []
    assert ssh.run("echo alive").stdout == "alive\n"


def test_aes_gcm_is_offered_first_and_the_others_stay_for_a_server_without_it(sim_session: LabSession) -> None:
    """Old behaviour: paramiko's first choice, aes128-ctr with hmac-sha2-256, whose MAC paramiko computes and
    compares per packet in Python: a third more controller CPU per byte (docs/nested-findings.md)."""
    conn = fresh_connection(sim_session, "hostA")
    try:
        transport = conn.client().get_transport()
        assert transport is not None
        chosen = (transport.local_cipher, transport.remote_cipher)  # type: ignore[attr-defined]
        offered = transport.get_security_options().ciphers
    finally:
        conn.close()
    assert chosen == ("aes128-gcm@openssh.com",) * 2
    assert offered[:2] == ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") and "aes128-ctr" in offered


def test_each_host_is_its_own_sshd(sim_session: LabSession) -> None:
    hosts = sim_session.inventory.hosts
    seen = {h.name: sim_session.ssh(h.name).run("echo $LABS_SIM_HOST").stdout.strip() for h in hosts}
    assert seen == {"hostA": "hostA", "hostB": "hostB"}


def test_pool_reuses_one_connection_per_host(sim_session: LabSession) -> None:
    conn = sim_session.ssh("hostA")
    transport = conn.client().get_transport()
    conn.run("true")
    assert sim_session.ssh("hostA") is conn
    assert conn.client().get_transport() is transport


def test_stdin_is_passed(sim_session: LabSession) -> None:
    assert sim_session.ssh("hostB").run("wc -c", stdin=b"x" * 1000).stdout.strip() == "1000"


def test_timeout_kills_the_remote_command_and_its_children(sim_session: LabSession) -> None:
    conn = sim_session.ssh("hostA")
    marker = f"60.{uuid.uuid4().int % 10**6:06d}"  # a unique sleep length identifies our processes
    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        conn.run(f"echo started; sleep {marker} & sh -c 'sleep {marker}'", timeout=1)
    assert time.monotonic() - start < 10
    assert info.value.stdout == "started\n"
    assert "timed out after 1s" in str(info.value)
    time.sleep(0.5)
    left = conn.run(f"pgrep -af '[s]leep {marker}' || true").stdout.strip()
    assert left == "", f"remote processes survived the timeout: {left}"


def test_sftp_put_and_get(sim_session: LabSession, tmp_path: Path) -> None:
    conn = sim_session.ssh("hostB")
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 100)
    remote = f"/tmp/labs-sftp-{uuid.uuid4().hex[:8]}"
    try:
        conn.put(src, remote, mode=0o600)
        assert conn.run(f"stat -c %a {remote}").stdout.strip() == "600"
        conn.get(remote, tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    finally:
        conn.run(f"rm -f {remote}")


def test_wrong_host_key_is_refused(sim_session: LabSession, tmp_path: Path) -> None:
    # pin hostA's address to a key that is not its host key
    other = tmp_path / "other_key"
    keys.keygen(other, "not-the-host")
    spec = sim_session.inventory.host("hostA").spec
    known = tmp_path / "known_hosts"
    keys.write_known_hosts(known, [(spec.address, spec.port, other)])
    conn = fresh_connection(sim_session, "hostA", known_hosts=known)
    with pytest.raises(HostKeyError, match="host key mismatch"):
        conn.run("true")
    # ...also with accept-new, which only ever adds keys for unknown hosts
    conn = fresh_connection(sim_session, "hostA", known_hosts=known, host_key_policy=HostKeyPolicy.ACCEPT_NEW)
    with pytest.raises(HostKeyError, match="host key mismatch"):
        conn.run("true")


def test_unknown_host_is_refused_under_strict_checking(sim_session: LabSession, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    conn = fresh_connection(sim_session, "hostB", known_hosts=empty)
    with pytest.raises(HostKeyError, match=r"not in .*known_hosts.*accept-new"):
        conn.run("true")
    assert empty.read_text() == "", "strict checking must never add a key"


def test_accept_new_pins_the_key_on_first_use(sim_session: LabSession, tmp_path: Path) -> None:
    known = tmp_path / "sub" / "known_hosts"
    conn = fresh_connection(sim_session, "hostB", known_hosts=known, host_key_policy=HostKeyPolicy.ACCEPT_NEW)
    assert conn.run("true").ok
    spec = sim_session.inventory.host("hostB").spec
    line = known.read_text().strip()
    assert line.startswith(f"[{spec.address}]:{spec.port} ssh-ed25519 ")
    # and the pinned key is then trusted under strict checking
    assert fresh_connection(sim_session, "hostB", known_hosts=known).run("true").ok


def test_jump_host(sim_session: LabSession) -> None:
    jump = sim_session.ssh("hostA")
    spec = sim_session.inventory.host("hostB").spec
    conn = HostConnection("hostB", spec, connect_timeout=5, jump=jump)
    assert conn.run("echo $LABS_SIM_HOST").stdout.strip() == "hostB"
    # the connection rides inside the jump host's: closing that one ends it
    transport = conn.client().get_transport()
    assert transport is not None and transport.is_active()
    jump.close()
    deadline = time.monotonic() + HANG_S
    while transport.is_active() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not transport.is_active()
    assert conn.run("echo $LABS_SIM_HOST", idempotent=True).stdout.strip() == "hostB"


def test_sudo_is_used_only_for_non_root_users() -> None:
    base = Host(address="127.0.0.1", user="lab", sudo=True)
    assert HostConnection("h", base).wrap("id", 5).startswith("sudo -n -- timeout -k 3 5 sh -c ")
    root = Host(address="127.0.0.1", user="root", sudo=True)
    assert HostConnection("h", root).wrap("id", 5).startswith("timeout ")
    plain = Host(address="127.0.0.1", user="lab")
    assert not HostConnection("h", plain).wrap("id", 5).startswith("sudo")


def test_unreachable_host_is_one_clear_error(sim_session: LabSession) -> None:
    conn = fresh_connection(sim_session, "hostA", port=1)
    with pytest.raises(SSHError, match=r"hostA: cannot reach root@127\.0\.0\.2:1|hostA: cannot reach .*:1"):
        conn.run("true")


def test_reconnect_after_sshd_restart(tmp_path: Path) -> None:
    from tests.conftest import write_sim_inventory

    inventory = open_inventory(write_sim_inventory(tmp_path))
    with LabSession(inventory) as session:
        assert session.sim is not None
        conn = session.ssh("hostA")
        assert conn.run("true").ok
        sshd: SimSshd = next(s for s in session.sim.sshds() if s.host == "hostA")
        sshd.stop()  # the "host" goes down, its sessions with it
        sshd.start()
        # a non-idempotent call is never retried after the connection dropped under it...
        try:
            conn.run("true")
        except (ConnectionLost, SSHError):
            pass  # allowed: the dead transport may only be noticed mid-call
        # ...while an idempotent one reconnects and succeeds
        assert conn.run("echo back", idempotent=True).stdout == "back\n"
        sshd.stop()
        sshd.start()
        assert conn.run("echo again", idempotent=True).stdout == "again\n"


def test_non_idempotent_call_is_not_retried(tmp_path: Path) -> None:
    from tests.conftest import write_sim_inventory

    inventory = open_inventory(write_sim_inventory(tmp_path))
    with LabSession(inventory) as session:
        assert session.sim is not None
        conn = session.ssh("hostB")
        counter = tmp_path / "count"
        sshd = next(s for s in session.sim.sshds() if s.host == "hostB")
        # the command kills its own sshd session mid-call: the connection drops with the call in flight
        kill_session = (
            "p=$$; while p=$(ps -o ppid= -p $p | tr -d ' '); [ \"$p\" -gt 1 ]; do "
            '[ "$(ps -o comm= -p $p)" = sshd ] && { kill -9 $p; break; }; done'
        )
        cmd = f"echo x >> {counter}; {kill_session}; sleep 5"
        with pytest.raises((ConnectionLost, SSHError)):
            conn.run(cmd)
        assert counter.read_text() == "x\n", "a non-idempotent command ran more than once"
        assert sshd.pid() is not None


def test_provisioning_again_never_rewrites_what_sshd_reads(tmp_path: Path) -> None:
    """Every run and xdist worker provisions the sim lab while others authenticate: an unchanged
    authorized_keys or known_hosts stays the same file, and a changed one is replaced whole."""
    from labs.simlab.lifecycle import SimLab
    from tests.conftest import write_sim_inventory

    inventory = open_inventory(write_sim_inventory(tmp_path))  # provisions it
    lab = SimLab(inventory)
    files = [
        lab.dir / "authorized_keys",
        *{h.spec.known_hosts.expanduser() for h in inventory.hosts if h.spec.known_hosts},
    ]
    before = {f: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_text()) for f in files}
    assert all(text for *_stat, text in before.values())
    lab.provision()
    assert {f: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_text()) for f in files} == before
    files[0].write_text("stale\n")
    lab.provision()
    assert files[0].read_text() == before[files[0]][2]
    assert not list(lab.dir.glob(".*.tmp"))


def test_a_listener_no_pidfile_names_still_goes_down_with_its_host(tmp_path: Path) -> None:
    """A start killed between its fork and the pidfile (`lab defects` SIGTERMed as a pytest run started its sim
    lab) left a listening sshd behind: stop finds it by its config."""
    from tests.conftest import write_sim_inventory

    inventory = open_inventory(write_sim_inventory(tmp_path))
    with LabSession(inventory) as session:
        assert session.sim is not None
        sshd = next(s for s in session.sim.sshds() if s.host == "hostA")
        listener = sshd.pid()
        assert listener is not None and sshd.started() == [listener]
        sshd.pidfile.unlink()
        reader = subprocess.Popen(["tail", "-f", str(sshd.config)], stdout=subprocess.DEVNULL)
        try:
            assert sshd.stop()
            assert reader.poll() is None  # a program naming the file is not an sshd of it
        finally:
            reader.kill()
            reader.wait()
        assert not Path(f"/proc/{listener}").exists() and not sshd.listening()
        assert not sshd.stop()  # nothing left to stop
        sshd.start()  # the session's own stop finds it as usual
