"""protocol.fingerprint: hashing and matching what the OS reports; the two OS readers agree."""

from __future__ import annotations

from client_stub import machine
from lmgrd.storage import host
from protocol.fingerprint import Fingerprint, usable_macs

MAC_A, MAC_B = "02:42:ac:11:00:02", "3c:22:fb:10:20:30"


def test_usable_macs_normalises_and_drops_loopback_and_odd_entries() -> None:
    raw = ["3C-22-FB-10-20-30", "00:00:00:00:00:00", "", "ab:cd", MAC_A, MAC_A.upper()]
    assert usable_macs(raw) == [MAC_A, MAC_B]
    assert usable_macs([]) == []


def test_of_hashes_the_short_hostname_and_the_normalised_machine_id() -> None:
    a = Fingerprint.of("LicSrv01.corp.example", " ABC123\n", [MAC_A])
    b = Fingerprint.of("licsrv01", "abc123", [MAC_A])
    assert a == b and len(a.digest) == 64 and MAC_A not in a.macs  # stored hashed, never in clear
    assert Fingerprint.of("licsrv02", "abc123", [MAC_A]) != a
    assert Fingerprint.of("", "", []).host != Fingerprint.of("x", "", []).host


def test_matching_needs_host_machine_and_one_common_mac() -> None:
    here = Fingerprint.of("pc1", "m1", [MAC_A, MAC_B])
    assert here.matches(Fingerprint.of("pc1", "m1", [MAC_B]))  # an interface went away
    assert not here.matches(Fingerprint.of("pc1", "m1", ["aa:bb:cc:dd:ee:ff"]))
    assert not here.matches(Fingerprint.of("pc2", "m1", [MAC_A]))
    assert not here.matches(Fingerprint.of("pc1", "m2", [MAC_A]))
    assert Fingerprint.of("pc1", "m1", []).matches(Fingerprint.of("pc1", "m1", []))
    assert not Fingerprint.of("pc1", "m1", []).matches(here)


def test_the_daemon_and_the_client_read_this_machine_alike() -> None:
    """Two readers of the OS (lmgrd and client_stub never import each other): they must agree."""
    assert host.machine_id() == machine.machine_id()
    assert host.mac_addresses() == machine.mac_addresses()
    assert host.this_fingerprint() == machine.this_fingerprint()
    assert host.this_fingerprint().matches(machine.this_fingerprint())
