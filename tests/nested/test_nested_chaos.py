"""Killed migration runs on the nested lab leave nothing that `lab janitor` does not remove.

Each round starts one test of suites/migration (round 1: a fault that removes or creates an
mdev; round 2, one of: a killed destination or source QEMU, a cut link, an aborted job, a plain migration, a
libvirt daemon stopped or killed, a degraded link, an abort on the destination, a destroy during finish,
a migration deadline that suspends the source, the destination host rebooted (the janitor powers on a
host left down), the real driver failing an arc or cutting its stream short (suites/recovery on
mtty_faults))
against the nested lab, waits until the run reaches the destination host (an incoming domain,
a fault's mdev record or firewall table, the inventory's mdev removed), then a random few
seconds so that the kill lands in the fault or the migration, and SIGKILLs the whole process
group. Then `lab janitor`, and on both hosts nothing of the killed run may be left: domains, QEMUs, save
images, mdevs other than the inventory's (and the inventory's all present), mdev records, agents,
firewall rules with its tag, netem qdiscs and records, a libvirt daemon stopped or dead, reservation
records and held locks, a driver's fault knobs left armed; nor its run marks here. A
normal migration must pass afterwards.

LABS_CHAOS_SEED=<int> replays a sequence (the seed is in every assertion message). The test runs
only against the nested inventory by name (`--inventory inventories/nested.yaml`, as
`tox -e nested` does) or with LABS_NESTED_CHAOS=1: a `pytest tests` elsewhere on the machine must
not kill runs on a lab someone is using.
"""

from __future__ import annotations

import fnmatch
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from labs.errors import LabError
from labs.faults import netem
from labs.faults.mdevs import RECORD_DIR
from labs.faults.network import rule_tag
from labs.inventory.models import MdevDevice
from labs.nested import lifecycle
from labs.paths import REPO_ROOT, SUITES
from labs.session import LabSession, open_inventory
from labs.virt.domain import REMOTE_IMAGE_DIR
from tests.chaos import LAB, chaos_env, chaos_run_id, chaos_seed, kill_when, run_marks
from tests.nested.test_nested_smoke import nested_hosts  # noqa: F401  (the fixture: skips unless the lab is up)

pytestmark = pytest.mark.slow

# round n picks its test from ROUNDS[n]: the first always changes mdevs (what only a host-side record finds)
ROUNDS = (
    ("test_incompatible_destination_device", "test_destination_lacks_device"),
    # one round for the rest (each round costs a pytest start with its doctor): over nightly runs, each is drawn
    (
        "test_kill_destination_qemu",
        "test_kill_source_qemu",
        "test_cut_migration_link",
        "test_abort_mid_flight",
        "test_migrate_and_back",
        "test_stop_libvirt_daemon",
        "test_kill_libvirt_daemon",
        "test_degraded_link",
        "test_abort_on_destination",
        "test_destroy_during_finish",
        "test_destination_host_reboots",  # killed while the host is down: the janitor powers it on
        "test_deadline_suspends_the_source",  # killed with the source paused by the deadline's action
        # the real driver failing an arc or sending its stream short (suites/recovery, on mtty_faults)
        "recovery::test_source_fails_stop_copy",
        "recovery::test_destination_never_loads_the_state",
    ),
)
# the suite and the devices a round's test runs on: plain mtty, or the driver with fault knobs
WHERE = {"migration": ("migration", "*:mtty-2"), "recovery": ("recovery", "*:mtty_faults-*")}
MAX_DELAY_S = 6.0  # after the destination is touched: inside the fault or the TCG migration (5-15 s)
# a fault that lands later than that: the reboot comes once RAM moves, ~7 s after the incoming domain appears
LATER_S = {"test_destination_host_reboots": 10.0}
START_WAIT_S = 240.0  # pytest start, doctor, the first VM and its fault on a busy 2-core machine
LOCK_DIR = "/run/labs/locks"

# One round trip per host: what of the run is there. `[.]`/`[-]` keep the patterns from matching this script.
HOST_SCRIPT = """
run={run}; tag={tag}
virsh -c qemu:///system list --all --name | grep -F -- "$run" | sed 's/^/domain /'
pgrep -f "qemu-system[-].*guest=$run" | sed 's/^/qemu pid /'
ls -1 {images} 2>/dev/null | grep -F -- "$run" | sed 's/^/image /'
ls -1 {records} 2>/dev/null | grep -F -- "$run" | sed 's/^/mdev-record /'
ls -1 /sys/bus/mdev/devices 2>/dev/null | sed 's/^/mdev /'
pgrep -af 'labs_agent[.]py' | sed 's/^/agent /'
nft list tables 2>/dev/null | grep -F -- "$tag" | sed 's/^/nft /'
ls -1 {netem} 2>/dev/null | grep -F -- "$tag" | sed 's/^/netem-record /'
tc qdisc show 2>/dev/null | grep -w netem | sed 's/^/netem /'
for d in virtqemud libvirtd; do
  pid=$(systemctl show -p MainPID --value "$d" 2>/dev/null)
  [ -n "$pid" ] && [ "$pid" != 0 ] && grep -q '^State:[[:space:]]*T' /proc/"$pid"/status && echo "daemon $d stopped"
  systemctl is-failed --quiet "$d" 2>/dev/null && echo "daemon $d dead (failed)"
done
command -v iptables >/dev/null && iptables -S INPUT | grep -F -- "$tag" | sed 's/^/iptables /'
for o in {locks}/*.owner; do [ -e "$o" ] && echo "reservation-record $o $(cat "$o")"; done
for f in {locks}/*.lock; do [ -e "$f" ] && {{ flock -n "$f" true || echo "held-lock $f"; }}; done
p=/sys/module/mtty_faults/parameters
[ -d $p ] && {{ [ "$(cat $p/fail_from)" = -1 ] || echo "knob fail_from=$(cat $p/fail_from)"; }}
[ -d $p ] && {{ [ "$(cat $p/stream_cut)" = 0 ] || echo "knob stream_cut=$(cat $p/stream_cut)"; }}
true
"""
TOUCHED_SCRIPT = """
virsh -c qemu:///system list --all --name | grep -F -- {run} | sed 's/^/domain /'
ls -1 {records} 2>/dev/null | grep -F -- {run} | sed 's/^/mdev record /'
nft list tables 2>/dev/null | grep -F -- {tag} | sed 's/^/nft /'
[ -n "{uuid}" ] && ! [ -e /sys/bus/mdev/devices/{uuid} ] && echo "inventory mdev {uuid} removed"
true
"""


@pytest.fixture(scope="module")
def nested(nested_hosts: object, request: pytest.FixtureRequest) -> Iterator[LabSession]:  # noqa: F811
    asked = request.config.getoption("--inventory", default=None)
    named = asked is not None and Path(asked).resolve() == lifecycle.NESTED_INVENTORY.resolve()
    if not named and os.environ.get("LABS_NESTED_CHAOS") != "1":
        pytest.skip(
            "kills runs on the nested lab: only with --inventory inventories/nested.yaml (tox -e nested) "
            "or LABS_NESTED_CHAOS=1"
        )
    with LabSession(open_inventory(lifecycle.NESTED_INVENTORY)) as session:
        yield session


def on_hosts(session: LabSession, run_id: str, down_ok: bool = False) -> list[str]:
    """Everything of `run_id` on the lab's hosts, and any mdev the inventory does not have (or lacks).
    `down_ok`: a host that does not answer (rebooted by the killed run) is a line, not an error."""
    script = HOST_SCRIPT.format(
        run=run_id,
        tag=rule_tag(run_id, ""),
        images=REMOTE_IMAGE_DIR,
        records=RECORD_DIR,
        locks=LOCK_DIR,
        netem=netem.RECORD_DIR,
    )
    out: list[str] = []
    for host in session.inventory.hosts:
        mine = [d.spec for d in session.inventory.devices if d.host.name == host.name]
        wanted = {spec.uuid for spec in mine if isinstance(spec, MdevDevice)}
        try:
            lines = session.ssh(host.name).run(script, timeout=120, sudo=True, check=True).stdout.splitlines()
        except LabError as exc:
            if not down_ok:
                raise
            out.append(f"{host.name}: not answering ({exc})")
            continue
        present = {line.split()[1] for line in lines if line.startswith("mdev ")}
        out += [f"{host.name}: {line}" for line in lines if line and not line.startswith("mdev ")]
        out += [f"{host.name}: mdev {u} (not the inventory's)" for u in sorted(present - wanted)]
        out += [f"{host.name}: inventory mdev {u} missing" for u in sorted(wanted - present)]
    return out


def touched_destination(session: LabSession, run_id: str, seen: list[str], devices: str) -> Callable[[], bool]:
    """The run reached the destination of the pair its `--lab-device` glob chose: a migration's incoming domain,
    a fault's mdev record or firewall table, or the inventory's mdev removed (what was seen goes to `seen`).
    Kills after this land in a migration or a fault."""
    pair = next(p for p in session.inventory.pairs if fnmatch.fnmatchcase(p.source.id, devices))
    uuid = pair.destination.spec.uuid if isinstance(pair.destination.spec, MdevDevice) else ""
    script = TOUCHED_SCRIPT.format(run=run_id, tag=rule_tag(run_id, ""), records=RECORD_DIR, uuid=uuid)

    def ready() -> bool:
        seen[:] = session.ssh(pair.destination.host.name).run(script, timeout=60, sudo=True).stdout.splitlines()
        return bool(seen)

    return ready


def pytest_args(*selection: str, devices: str = "*:mtty-2") -> list[str]:
    # no doctor in the children: the session's own doctor found the hosts healthy, and the migration after the
    # kills is what proves they still are
    return [
        *selection,
        f"--lab-device={devices}",
        "-p",
        "no:cacheprovider",
        "-q",
        "--lab-no-doctor",
        "--inventory",
        str(lifecycle.NESTED_INVENTORY),
    ]


def test_killed_migration_runs_leave_nothing_the_janitor_misses(nested: LabSession, tmp_path: Path) -> None:
    seed = chaos_seed()
    rng = random.Random(seed)
    started = time.monotonic()
    images = tmp_path / "images"
    for n, choices in enumerate(ROUNDS, start=1):
        run_id, test, delay = chaos_run_id(rng), rng.choice(choices), rng.uniform(0.0, MAX_DELAY_S)
        delay += LATER_S.get(test, 0.0)
        what = f"seed {seed}, round {n}, run {run_id}, {test} killed {delay:.1f}s after it reached the destination"
        suite, devices = WHERE[test.split("::")[0] if "::" in test else "migration"]
        args = pytest_args(str(SUITES / suite), "-k", test.split("::")[-1], devices=devices)
        log = tmp_path / f"round{n}.log"
        seen: list[str] = []
        # what the hosts held before the round (this session's own agents, when suites ran first) is not the run's
        before = set(on_hosts(nested, run_id))
        ready = touched_destination(nested, run_id, seen, devices)
        outcome = kill_when(args, chaos_env(run_id, images), log, ready, delay, wait=START_WAIT_S, poll=0.5)
        outcome += f" on {seen}" if seen else ""
        landed = on_hosts(nested, run_id, down_ok=True)  # where the kill landed, for the message
        janitor = subprocess.run(
            [LAB, "janitor", "--inventory", str(lifecycle.NESTED_INVENTORY)],
            env=chaos_env(None, images),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert janitor.returncode == 0, f"{what}: lab janitor failed: {janitor.stdout}{janitor.stderr}"
        left = [thing for thing in on_hosts(nested, run_id) if thing not in before] + run_marks(run_id)
        left += [f"controller image {p.name}" for p in images.glob(f"{run_id}*")] if images.exists() else []
        report = f"{what} ({outcome}); at the kill: {landed}\njanitor said:\n{janitor.stdout}"
        print(f"{report}left: {left}\n")
        assert not left, f"{report}left: {left}\nlog:\n{log.read_text(errors='replace')[-3000:]}"
    one_migration = pytest_args(str(SUITES / "migration" / "test_live_migration.py"), "-k", "test_migrate_and_back")
    following = subprocess.run(
        [sys.executable, "-m", "pytest", *one_migration],
        cwd=REPO_ROOT,
        env=chaos_env(None, images),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert following.returncode == 0, f"seed {seed}: the migration after the kills failed:\n{following.stdout[-4000:]}"
    assert "1 passed" in following.stdout, f"seed {seed}: {following.stdout[-2000:]}"
    print(f"seed {seed}: {len(ROUNDS)} rounds and the following migration in {time.monotonic() - started:.0f}s")
