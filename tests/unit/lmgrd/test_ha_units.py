"""HA pieces that need no etcd: the HA license (servers), the registration request's ``hosts:``, the store config."""

from __future__ import annotations

import dataclasses
from datetime import UTC, date, datetime

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lmgrd.config import ConfigInvalid, build_config
from lmgrd.vendor.signing import check_request, sign_license
from protocol.license import License, LicenseFileError, Product, canonical_license_bytes, host_mismatch, verify_license

SERVERS = (("lic1", "192.0.2.11"), ("lic2", "192.0.2.12"), ("lic3", "192.0.2.13"))


def ha_license(servers: tuple[tuple[str, str], ...] = SERVERS) -> License:
    return License(customer_id="CID-AAAA-BBBB-CCCC-DDDD", license_type="multi", customer="Example",
                   hostname=servers[0][0], ip=servers[0][1], products=(Product("CADPRO", "2.1", 25),),
                   issued_at=datetime(2026, 1, 1, tzinfo=UTC), expires=None, site_networks=(), share="user_host",
                   servers=servers)


def test_an_ha_license_round_trips_signed_and_each_server_serves_it() -> None:
    key = Ed25519PrivateKey.generate()
    lic = ha_license()
    text = sign_license(lic, key)
    assert "server         lic2 192.0.2.12" in text or "server lic2 192.0.2.12" in " ".join(text.split())
    back = verify_license(text, key.public_key(), "ha.lic")
    assert back == lic
    for name, ip in SERVERS:
        assert host_mismatch(back, name, [ip, "127.0.0.1"]) == []
    problems = host_mismatch(back, "other", ["192.0.2.99"])
    assert len(problems) == 1 and "lic1 (192.0.2.11), lic2 (192.0.2.12), lic3 (192.0.2.13)" in problems[0]
    # The name of one server with the address of another is not that server.
    assert host_mismatch(back, "lic1", ["192.0.2.12"]) != []


def test_the_server_list_is_signed_and_old_licenses_keep_their_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    text = sign_license(ha_license(), key)
    tampered = text.replace("lic3 192.0.2.13", "evil 192.0.2.66")
    with pytest.raises(LicenseFileError):
        verify_license(tampered, key.public_key(), "ha.lic")
    single = dataclasses.replace(ha_license(), servers=())
    assert b"servers" not in canonical_license_bytes(single)  # licenses issued before HA verify as before


@pytest.mark.parametrize(("servers", "why"), [
    ((("lic1", "192.0.2.11"),), "2 or 3 servers"),
    ((*SERVERS, ("lic4", "192.0.2.14")), "2 or 3 servers"),
    ((("lic1", "192.0.2.11"), ("LIC1", "192.0.2.12")), "listed twice"),
])
def test_bad_server_lists_are_refused(servers: tuple[tuple[str, str], ...], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ha_license(servers)


def request(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"license_type": "multi", "customer": "Example",
                               "products": [{"name": "CADPRO", "version": "2.1", "count": 25}]}
    base.update(kw)
    return base


def test_a_registration_request_with_hosts_becomes_an_ha_license() -> None:
    spec, problems = check_request(request(hosts=[{"hostname": n, "ip": ip} for n, ip in SERVERS]), date(2026, 1, 1))
    assert problems == [] and spec is not None
    lic = spec.to_license("CID-AAAA-BBBB-CCCC-DDDD", datetime(2026, 1, 1, tzinfo=UTC))
    assert lic.servers == SERVERS and (lic.hostname, lic.ip) == SERVERS[0]


@pytest.mark.parametrize(("kw", "path", "text"), [
    ({"hosts": [{"hostname": "lic1", "ip": "192.0.2.11"}]}, "hosts", "2 or 3 servers"),
    ({"hosts": [{"hostname": "lic1", "ip": "192.0.2.11"}, {"hostname": "lic2", "ip": "nope"}]}, "hosts[1].ip", ""),
    ({"hosts": [{"hostname": "lic1", "ip": "192.0.2.11"}, {"hostname": "lic1", "ip": "192.0.2.12"}]},
     "hosts[1].hostname", "listed twice"),
    ({"hosts": [{"hostname": "a", "ip": "192.0.2.1"}, {"hostname": "b", "ip": "192.0.2.2"}],
      "host": {"hostname": "a", "ip": "192.0.2.1"}}, "hosts", "not both"),
])
def test_bad_hosts_in_a_request_name_the_field(kw: dict[str, object], path: str, text: str) -> None:
    spec, problems = check_request(request(**kw), date(2026, 1, 1))
    assert spec is None
    assert any(p.path == path and text in p.message for p in problems), problems


BASE = {"licenses": ["x.lic"], "vendor_key": "v.pub"}


def test_store_etcd_config_and_its_errors() -> None:
    cfg = build_config({**BASE, "store": "etcd", "etcd_endpoints": "10.0.0.1:2379, 10.0.0.2:2379"}, {}, "t")
    assert cfg.store == "etcd" and cfg.etcd_endpoints == ("10.0.0.1:2379", "10.0.0.2:2379")
    assert build_config(BASE, {}, "t").store == "journal"
    cases = [
        ({"store": "redis"}, "store: expected 'journal'"),
        ({"store": "etcd"}, "etcd_endpoints: store: etcd needs"),
        ({"store": "etcd", "etcd_endpoints": "10.0.0.1"}, "is not host:port"),
        ({"store": "etcd", "etcd_endpoints": ["h:1"], "etcd_cert": "c.pem"}, "needs both the certificate"),
        ({"store": "etcd", "etcd_endpoints": ["h:1"], "etcd_user": "lm"}, "needs both the user"),
        ({"store": "etcd", "etcd_endpoints": ["h:1"], "etcd_prefix": "lm"}, "starting with '/'"),
    ]
    for extra, text in cases:
        with pytest.raises(ConfigInvalid) as info:
            build_config({**BASE, **extra}, {}, "t")
        assert any(text in p for p in info.value.problems), (extra, info.value.problems)
