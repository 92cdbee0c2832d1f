"""FlexNet options files read into the usage policy (``lmgrd.core.options``), and their join with the YAML policy.

The files are in the shapes vendors' documentation publishes; each test names its source:

- Revenera, FlexNet Publisher License Administration Guide, "Simple Options File Example"
  (docs.revenera.com/fnp/2024r1/LicAdmin_Guide/Content/helplibrary/Simple_Options_File_Example.htm)
- Revenera, same guide, "Limiting Access for Multiple Users"
  (docs.revenera.com/fnp/2026r1/LicAdmin_Guide/Content/helplibrary/Limiting_Access_for_Multiple_Users.htm)
- Macrovision, FLEXnet Licensing End User Guide, chapter 5 "The Options File" (pages 49, 51, 57, 58: the type
  specification, ``EXCLUDE f1 USER hank``, ``INCLUDEALL USER jane``, ``MAX 5 f1 USER jan``, ``TIMEOUT f1 3600``)
- PTC, Creo installation guide, "Changing the Inactivity Timeout Parameter" (``TIMEOUTALL 7200`` in ptc.opt)
- Revenera, same guide, "GROUP" (several GROUP lines of one name add up; USER_GROUP is an alias) and
  "Managing the Options File" (``\\`` continues a line)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmgrd.config import ConfigInvalid, DaemonConfig, build_config
from lmgrd.core.options import parse_options
from lmgrd.core.policy import MIN_IDLE_TIMEOUT, Policy, address_matches, combine_policies, parse_policy

SIMPLE = """\
RESERVE 1 compile USER robert
RESERVE 3 compile HOST mainline
EXCLUDE compile USER lori
NOLOG QUEUED
"""

MULTIPLE_USERS = """\
# First define the group "Hackers"
GROUP Hackers bob howard james
# Then exclude the group
EXCLUDE toothbrush GROUP Hackers
HOST_GROUP writers fred barney
EXCLUDE f1 HOST_GROUP writers
"""

END_USER_GUIDE = """\
EXCLUDE f1 USER hank
INCLUDEALL USER jane
MAX 5 f1 USER jan
TIMEOUT f1 3600
"""


def test_revenera_simple_example() -> None:
    opts = parse_options(SIMPLE, "/opt/sampled/licenses/sampled.opt")
    pp = opts.policy.get("compile")
    assert pp is not None
    assert [(r.seats, r.subject.kind, r.subject.name) for r in pp.reserve] == [(1, "user", "robert"),
                                                                                (3, "host", "mainline")]
    assert pp.reserved_total == 4  # "there must be a minimum of four licenses on the compile FEATURE line"
    assert pp.refusal("lori", "anywhere") is not None and "exclude user lori, sampled.opt line 3" in str(
        pp.refusal("lori", "anywhere"))
    assert pp.refusal("robert", "mainline") is None
    assert opts.problems == ()
    assert opts.unsupported == ("/opt/sampled/licenses/sampled.opt line 4: NOLOG is not supported by lmgrd "
                                "(lmgrd logs every checkout and denial); the line is ignored",)


def test_revenera_groups_and_host_groups() -> None:
    opts = parse_options(MULTIPLE_USERS, "x.opt")
    assert opts.problems == opts.unsupported == ()
    tooth = opts.policy.get("toothbrush")
    assert tooth is not None
    for user in ("bob", "howard", "james", "BOB"):
        assert tooth.refusal(user, "pc1") is not None
    assert tooth.refusal("alice", "pc1") is None
    f1 = opts.policy.get("f1")
    assert f1 is not None
    assert f1.refusal("alice", "fred.example.com") is not None  # short host names, case-insensitive
    assert f1.refusal("alice", "Barney") is not None
    assert f1.refusal("alice", "wilma") is None


def test_end_user_guide_lines_including_includeall_and_timeout() -> None:
    opts = parse_options(END_USER_GUIDE, "vendor.opt")
    assert opts.problems == opts.unsupported == ()
    f1, f2 = opts.policy.get("f1"), opts.policy.get("f2")
    assert f1 is not None and f2 is not None
    assert [(r.seats, str(r.subject)) for r in f1.max] == [(5, "user jan, vendor.opt line 3")]
    assert f1.timeout == 3600.0 and f2.timeout is None
    # INCLUDEALL: jane may use every product, and nobody else may use any (f1's exclude still applies).
    assert f2.refusal("jane", "pc") is None
    assert "include list" in str(f2.refusal("hank", "pc"))
    assert "exclude user hank" in str(f1.refusal("hank", "pc"))
    assert opts.policy.active and opts.policy.products.keys() == {"f1"}


def test_timeoutall_applies_to_every_product_without_its_own_timeout() -> None:
    opts = parse_options("TIMEOUTALL 7200\nTIMEOUT f1 3600\n", "ptc.opt")  # PTC ships TIMEOUTALL 7200
    assert opts.problems == opts.unsupported == ()
    f1, other = opts.policy.get("f1"), opts.policy.get("CREO")
    assert f1 is not None and other is not None
    assert (f1.timeout, other.timeout) == (3600.0, 7200.0)


def test_a_timeout_below_the_minimum_is_raised_to_it_and_listed() -> None:
    opts = parse_options("TIMEOUT f1 300\n", "v.opt")
    pp = opts.policy.get("f1")
    assert pp is not None and pp.timeout == MIN_IDLE_TIMEOUT
    assert opts.unsupported == ("v.opt line 1: TIMEOUT 300 s is below lmgrd's minimum idle timeout: 900 s is used "
                                "instead (FlexNet also raises a timeout to the vendor's minimum)",)


def test_groups_add_up_may_be_used_before_they_are_defined_and_continue_lines() -> None:
    text = ("RESERVE 2 CADPRO GROUP designers\n"
            "GROUP designers alice \\\n"
            "      bob\n"
            "USER_GROUP designers carol\n")
    opts = parse_options(text, "site.opt")
    assert opts.problems == opts.unsupported == ()
    pp = opts.policy.get("CADPRO")
    assert pp is not None
    assert pp.reserve[0].subject.members == frozenset({"alice", "bob", "carol"})


def test_display_and_internet_restrict_access() -> None:
    text = ("INCLUDE VIEWER DISPLAY kiosk:0\n"
            "INCLUDE VIEWER INTERNET 192.0.2.*\n"
            "EXCLUDE VIEWER HOST 192.0.2.66\n"
            "HOST_GROUP lab lab1 198.51.100.*\n"
            "EXCLUDEALL HOST_GROUP lab\n")
    opts = parse_options(text, "site.opt")
    assert opts.problems == opts.unsupported == ()
    viewer = opts.policy.get("VIEWER")
    assert viewer is not None
    assert viewer.refusal("u", "pc", "203.0.113.5", "KIOSK:0") is None  # by display
    assert viewer.refusal("u", "pc", "192.0.2.10", "pc:0") is None  # by address pattern
    assert viewer.refusal("u", "pc", "::ffff:192.0.2.10", "pc:0") is None  # dual-stack socket
    assert "exclude host 192.0.2.66" in str(viewer.refusal("u", "pc", "192.0.2.66", "pc:0"))
    assert "include list" in str(viewer.refusal("u", "pc", "203.0.113.5", "pc:0"))
    assert "host_group lab" in str(viewer.refusal("u", "lab1", "192.0.2.10", ""))
    assert "host_group lab" in str(viewer.refusal("u", "pc", "198.51.100.7", "pc:0"))


def test_reserve_and_max_by_display_or_address_apply_and_the_rest_is_listed_as_unsupported() -> None:
    text = ("RESERVE 1 f1 DISPLAY kiosk:0\n"
            "MAX 2 f1 INTERNET 10.0.0.*\n"
            "HOST_GROUP mixed pc1 10.0.0.9\n"
            "MAX 1 f1 HOST_GROUP mixed\n"
            "RESERVE 1 f1 PROJECT apollo\n"
            "MAX 1 f1 USER ALL_USERS\n"
            "INCLUDE f1:VERSION=2.0 USER bob\n"
            "GROUPCASEINSENSITIVE ON\n"
            "GROUPCASEINSENSITIVE OFF\n")
    opts = parse_options(text, "s.opt")
    assert opts.problems == ()
    assert [u.split(":", 1)[0] for u in opts.unsupported] == [
        "s.opt line 5", "s.opt line 6", "s.opt line 7", "s.opt line 9"]
    assert "PROJECT" in opts.unsupported[0] and "ALL_USERS" in opts.unsupported[1]
    f1 = opts.policy.get("f1")
    assert f1 is not None
    assert [(r.seats, r.subject.kind, r.subject.name) for r in f1.reserve] == [(1, "display", "kiosk:0")]
    assert [(r.seats, r.subject.kind, r.subject.name) for r in f1.max] == [(2, "internet", "10.0.0.*"),
                                                                          (1, "host_group", "mixed")]
    assert f1.max[1].subject.members == frozenset({"pc1"}) and f1.max[1].subject.addresses == ("10.0.0.9",)


@pytest.mark.parametrize(("line", "expect"), [
    ("RESERVE two f1 USER bob", "line 1: RESERVE: the number of licenses 'two' is not a whole number >= 1"),
    ("RESERVE 0 f1 USER bob", "not a whole number >= 1"),
    ("MAX 3 f1 USER", "line 1: MAX takes 4 fields ('MAX num_lic feature type name'), got 3"),
    ("EXCLUDE f1 USR bob", "line 1: EXCLUDE: unknown type 'USR' (did you mean USER?)"),
    ("EXCLUDE f1 GROUP nobody", "line 1: EXCLUDE: no GROUP named 'nobody' in this file"),
    ("INCLUD f1 USER bob", "line 1: unknown keyword 'INCLUD' (did you mean INCLUDE?)"),
    ("TIMEOUT f1 soon", "line 1: TIMEOUT: 'soon' is not a whole number of seconds"),
    ("INCLUDE f/1 USER bob", "may contain only ASCII letters"),
    ("EXCLUDE f1 INTERNET 300.1.1.1", "INTERNET '300.1.1.1' is not an IP address"),
    ("GROUP lonely", "GROUP needs a name and at least one member"),
])
def test_a_bad_line_is_reported_with_file_and_line_and_ignored(line: str, expect: str) -> None:
    opts = parse_options(f"# header\n\n{line}\nEXCLUDE f9 USER mallory\n", "/etc/a.opt")
    assert len(opts.problems) == 1, opts.problems
    assert expect.replace("line 1", "line 3") in opts.problems[0]
    assert opts.problems[0].startswith("/etc/a.opt line 3: ") and opts.problems[0].endswith("; the line is ignored")
    f9 = opts.policy.get("f9")  # the rest of the file still applies
    assert f9 is not None and f9.refusal("mallory", "pc") is not None


def test_continued_line_is_reported_by_its_line_range() -> None:
    opts = parse_options("EXCLUDE f1 \\\n  GROUP nobody\n", "a.opt")
    assert opts.problems[0].startswith("a.opt lines 1-2: EXCLUDE: no GROUP named 'nobody'")


def test_a_second_timeout_for_the_same_product_is_a_problem() -> None:
    opts = parse_options("TIMEOUT f1 3600\nTIMEOUT f1 7200\nTIMEOUTALL 7200\nTIMEOUTALL 9000\n", "a.opt")
    assert [p.split(":", 1)[0] for p in opts.problems] == ["a.opt line 2", "a.opt line 4"]
    assert "already set on line 1" in opts.problems[0]
    pp = opts.policy.get("f1")
    assert pp is not None and pp.timeout == 3600.0


def test_address_patterns() -> None:
    assert address_matches("192.0.2.7", ("192.0.2.*",))
    assert not address_matches("192.0.3.7", ("192.0.2.*",))
    assert address_matches("2001:db8::1", ("2001:db8::1",))
    assert not address_matches("", ("*.*.*.*",))


def test_yaml_and_options_combine_per_product_yaml_first() -> None:
    yaml_policy, problems = parse_policy({"groups": {"d": ["alice"]},
                                          "policy": {"CADPRO": {"reserve": [{"seats": 1, "group": "d"}],
                                                                "timeout": 1800}}})
    assert problems == []
    opts = parse_options("RESERVE 2 CADPRO USER bob\nEXCLUDE CADPRO USER eve\nINCLUDEALL USER alice\n", "o.opt")
    merged = combine_policies(yaml_policy, opts.policy)
    pp = merged.get("CADPRO")
    assert pp is not None
    assert [(r.seats, r.subject.name) for r in pp.reserve] == [(1, "d"), (2, "bob")]
    assert pp.timeout == 1800 and pp.refusal("eve", "pc") is not None
    assert combine_policies(Policy(), Policy()).active is False


def _config(tmp_path: Path, options_text: str | None, **file_values: object) -> DaemonConfig:
    key, lic = tmp_path / "v.pub", tmp_path / "s.lic"
    values: dict[str, object] = {"licenses": [str(lic)], "vendor_key": str(key), **file_values}
    if options_text is not None:
        (tmp_path / "site.opt").write_text(options_text)
        values["options"] = str(tmp_path / "site.opt")
    return build_config(values, {}, "test.yaml")


def test_config_reads_the_options_file_into_the_policy(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "RESERVE 1 CADPRO USER robert\nLINGER CADPRO 60\nRESERVE x CADPRO USER y\n",
                  policy={"CADPRO": {"timeout": 3600}})
    pp = cfg.policy.get("CADPRO")
    assert pp is not None and pp.reserved_total == 1 and pp.timeout == 3600
    assert cfg.options == tmp_path / "site.opt"
    assert len(cfg.options_problems) == 1 and "line 3" in cfg.options_problems[0]
    assert len(cfg.options_unsupported) == 1 and "LINGER" in cfg.options_unsupported[0]


def test_config_reports_a_timeout_set_in_both_places(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "TIMEOUT CADPRO 7200\n", policy={"CADPRO": {"timeout": 3600}})
    assert cfg.options_problems == (
        f"{tmp_path / 'site.opt'} line 1: TIMEOUT for CADPRO clashes with policy.CADPRO.timeout (3600 s) in the "
        "YAML config, which is used; set it in one place",)


def test_an_unreadable_options_file_is_a_config_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as err:
        _config(tmp_path, None, options=str(tmp_path / "missing.opt"))
    assert any("options: cannot read the options file" in p and "missing.opt" in p for p in err.value.problems)


def test_a_shift_jis_options_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "sjis.opt").write_bytes("# 設計部の予約\nRESERVE 1 CADPRO USER tanaka\n".encode("cp932"))
    cfg = build_config({"licenses": ["s.lic"], "vendor_key": "v.pub", "options": str(tmp_path / "sjis.opt")}, {},
                       "t")
    pp = cfg.policy.get("CADPRO")
    assert pp is not None and pp.reserve[0].subject.name == "tanaka"
