"""The gettext catalogs: every error code in both languages, every msgid translated (with the same
placeholders), the committed ``.mo`` files compiled from the committed ``.po`` files and the ``.po`` files up
to date with the source; the language chosen from ``LMGRD_LANG`` and the locale; ``LicenseError`` and
lmclient's hostname rule in Japanese. Both domains are checked here: ``client_stub`` and ``lmgrd`` (lmutil).
"""

from __future__ import annotations

import gettext
import io
import re
import socket
import string
from pathlib import Path

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po

import lmgrd.i18n
from client_stub import cli, i18n
from client_stub.errors import CODE_MESSAGES, DEFAULT_HINTS, LicenseError, SeatDenied
from protocol import ErrorCode

ROOT = Path(__file__).resolve().parents[3]
DOMAINS = {"client_stub": i18n.LOCALE_DIR, "lmgrd": lmgrd.i18n.LOCALE_DIR}
#: The extraction keywords ``make i18n`` passes to Babel (the defaults plus these).
KEYWORDS = ("gettext_", "tr")
JAPANESE = re.compile(r"[\u3001-\u303f\u3040-\u30ff\u4e00-\u9fff]")  # CJK punctuation, kana, kanji


def _po(domain: str) -> Catalog:
    with open(DOMAINS[domain] / "ja" / "LC_MESSAGES" / f"{domain}.po", "rb") as f:
        return read_po(f)


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


@pytest.fixture
def ja(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMGRD_LANG", "ja")


@pytest.fixture
def en(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMGRD_LANG", "en")


# --------------------------------------------------------------------------- every code, both languages
@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_english_and_japanese(code: ErrorCode) -> None:
    ja = i18n.catalog("ja")
    for english in (CODE_MESSAGES[code], DEFAULT_HINTS[code]):
        assert english and english.isascii(), (code, english)
        japanese = ja.gettext(english)
        assert japanese != english and JAPANESE.search(japanese), f"{code}: no Japanese for {english!r}"
    assert i18n.catalog("en").gettext(CODE_MESSAGES[code]) == CODE_MESSAGES[code]


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_msgid_is_translated_with_the_same_placeholders(domain: str) -> None:
    cat = _po(domain)
    messages = [m for m in cat if m.id]
    assert len(messages) > 10
    for m in messages:
        assert isinstance(m.id, str) and isinstance(m.string, str)
        assert m.string, f"{domain}: untranslated: {m.id!r}"
        assert not m.fuzzy, f"{domain}: fuzzy: {m.id!r}"
        assert JAPANESE.search(m.string), f"{domain}: not Japanese: {m.string!r}"
        assert _fields(m.string) == _fields(m.id), f"{domain}: placeholders differ in {m.id!r}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_babel_compiles_the_catalog_without_errors(domain: str) -> None:
    """``make i18n`` compiles with Babel, which also checks %-placeholders: a msgid Babel takes for a %-format
    (``"5.0 % of"`` reads as ``"% o"``) fails the make target though the brace placeholders agree."""
    problems = [(m.id, str(err)) for m, errors in _po(domain).check() for err in errors]
    assert not problems, f"{domain}: pybabel compile would fail: {problems}"


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_po_file_has_every_msgid_of_the_source(domain: str) -> None:
    """A new ``_()`` string without its Japanese fails here: run ``make i18n`` and translate it."""
    in_source = {msgid for _, _, msgid, _, _ in extract_from_dir(
        ROOT / domain, [("**.py", "python")], keywords={**dict.fromkeys(KEYWORDS, None),
                                                        **_default_keywords()})}
    in_po = {m.id for m in _po(domain) if m.id}
    assert in_source, "nothing extracted: the extraction is broken"
    assert in_source <= in_po, f"not in the catalog (make i18n): {sorted(map(str, in_source - in_po))}"
    assert in_po <= in_source, f"in the catalog but no longer in the source: {sorted(map(str, in_po - in_source))}"


def _default_keywords() -> dict[str, object]:
    from babel.messages.extract import DEFAULT_KEYWORDS

    return dict(DEFAULT_KEYWORDS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_the_committed_mo_is_compiled_from_the_po(domain: str) -> None:
    """The runtime reads the ``.mo``; a ``.po`` edited without ``make i18n`` would never be seen."""
    buf = io.BytesIO()
    write_mo(buf, _po(domain))
    buf.seek(0)
    fresh = gettext.GNUTranslations(buf)
    with open(DOMAINS[domain] / "ja" / "LC_MESSAGES" / f"{domain}.mo", "rb") as f:
        committed = gettext.GNUTranslations(f)
    assert committed._catalog == fresh._catalog  # type: ignore[attr-defined]


def test_the_catalogs_are_package_data() -> None:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    for domain in DOMAINS:
        assert f'"{domain}.locale.ja.LC_MESSAGES" = ["*.po", "*.mo"]' in text


# --------------------------------------------------------------------------- which language
@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "en"),
    ({"LANG": "C.UTF-8"}, "en"),
    ({"LANG": "ja_JP.UTF-8"}, "ja"),
    ({"LANG": "en_US.UTF-8", "LC_MESSAGES": "ja_JP.UTF-8"}, "ja"),
    ({"LANG": "ja_JP.UTF-8", "LC_MESSAGES": "en_US.UTF-8"}, "en"),
    ({"LC_MESSAGES": "en_US.UTF-8", "LC_ALL": "ja_JP.eucJP"}, "ja"),
    ({"LC_ALL": "", "LANG": "ja_JP.UTF-8"}, "ja"),  # an empty variable does not count
    ({"LANG": "ja_JP.UTF-8", "LMGRD_LANG": "en"}, "en"),  # LMGRD_LANG wins
    ({"LC_ALL": "C", "LMGRD_LANG": "ja"}, "ja"),
    ({"LMGRD_LANG": "fr"}, "en"),  # no catalog: English
])
def test_the_language_comes_from_lmgrd_lang_then_the_locale(environ: dict[str, str], expected: str) -> None:
    assert i18n.language(environ) == expected
    assert lmgrd.i18n.language(environ) == expected


def test_the_language_is_read_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMGRD_LANG", "ja")
    assert i18n.gettext_("checked in") == "ライセンスを返却しました"
    monkeypatch.setenv("LMGRD_LANG", "en")
    assert i18n.gettext_("checked in") == "checked in"


# --------------------------------------------------------------------------- LicenseError
def test_license_error_in_english_is_the_servers_text(en: None) -> None:
    e = SeatDenied(ErrorCode.NO_SEATS, "all 3 seat(s) of CADPRO are in use", "wait or ask")
    assert str(e) == "NO_SEATS: all 3 seat(s) of CADPRO are in use. What to do: wait or ask"
    assert e.localized_message == e.message and e.localized_hint == "wait or ask"


def test_license_error_in_japanese_keeps_the_servers_english_detail(ja: None) -> None:
    e = SeatDenied(ErrorCode.NO_SEATS, "all 3 seat(s) of CADPRO are in use", "wait or ask")
    assert e.localized_message == "すべてのライセンスが使用中です。（詳細: all 3 seat(s) of CADPRO are in use）"
    assert e.localized_hint.startswith("すべてのライセンスが使用中です。しばらくしてから")
    assert str(e).startswith("NO_SEATS: すべてのライセンスが使用中です。（詳細: all 3 seat(s)")
    assert " 対処方法: " in str(e) and "What to do" not in str(e)
    # what logs and code read stays as the server said it
    assert e.code is ErrorCode.NO_SEATS and e.message == "all 3 seat(s) of CADPRO are in use"
    assert e.hint == "wait or ask"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_reads_in_japanese(ja: None, code: ErrorCode) -> None:
    e = LicenseError(code, "detail from the server")
    assert JAPANESE.search(e.localized_message) and "detail from the server" in e.localized_message
    assert JAPANESE.search(e.localized_hint)
    assert e.hint == DEFAULT_HINTS[code]  # the English default, for logs


# --------------------------------------------------------------------------- the hostname rule, in Japanese
def test_the_hostname_rule_reads_naturally_in_japanese(ja: None, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "設計部-pc1")
    assert cli.main(["hostid"]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    sentence, _, detail = err.partition("（詳細: ")
    assert sentence == (
        "lmclient: 警告: このコンピューターのホスト名 '設計部-pc1' では、ライセンスを使用できません。"
        "ホスト名に使えるのは半角英数字とハイフンだけです。日本語などの文字を含むホスト名のコンピューターで"
        "ライセンスを使用する、またはライセンスサーバーを動かすには、先にホスト名を変更してください。")
    assert detail == "使用できない文字 '計', '設', '部'）"  # the characters to change
    assert "cannot be licensed" not in err


def test_the_hostname_rule_stays_english_in_english(en: None, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "設計部-pc1")
    assert cli.main(["hostid"]) == cli.EXIT_CONFIG
    assert "this host's name '設計部-pc1' cannot be licensed" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["client_stub.i18n", "lmgrd.i18n"])
def test_the_argparse_msgids_are_argparses_own(module: str) -> None:
    """A msgid that is not character for character argparse's would never be looked up (argparse's text stays
    English): each must be a string literal in argparse's source."""
    import argparse
    import importlib
    import inspect

    source = inspect.getsource(argparse)
    messages = importlib.import_module(module).ARGPARSE_MESSAGES
    assert len(messages) >= 15
    for msgid in messages:
        assert repr(msgid) in source or f'"{msgid}"' in source, f"not an argparse message: {msgid!r}"


@pytest.mark.parametrize("module", ["client_stub.i18n", "lmgrd.i18n"])
def test_argparse_speaks_the_language_only_inside_the_block(module: str, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import argparse
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setenv("LMGRD_LANG", "ja")
    before = vars(argparse)["_"]
    with mod.argparse_in_language():
        parser = argparse.ArgumentParser(prog="demo")
        parser.add_argument("--n", type=int, required=True)
        parser.print_help()
        with pytest.raises(SystemExit):
            parser.parse_args(["--n", "x"])
    assert vars(argparse)["_"] is before
    out, err = capsys.readouterr()
    assert out.startswith("使い方: demo [-h] --n N") and "オプション:" in out
    assert "このヘルプを表示して終了します" in out
    assert err.splitlines()[-1] == "demo: エラー: 引数 --n: int の値として正しくありません: 'x'"
    english = argparse.ArgumentParser(prog="demo")  # outside: argparse's English again
    english.print_help()
    assert capsys.readouterr().out.startswith("usage: demo [-h]")


_PRINTF = re.compile(r"%\(\w+\)[sr]|%[sr]")


def test_the_argparse_twins_agree_and_every_message_has_its_japanese() -> None:
    """``client_stub`` and ``lmgrd`` may not import each other, so each has its ``ARGPARSE_MESSAGES`` and
    ``argparse_in_language``: the same messages, the same function, and in both catalogs the same Japanese for
    every message, with argparse's ``%`` placeholders (and trailing newline) kept."""
    import inspect

    assert i18n.ARGPARSE_MESSAGES == lmgrd.i18n.ARGPARSE_MESSAGES
    assert len(set(i18n.ARGPARSE_MESSAGES)) == len(i18n.ARGPARSE_MESSAGES)
    assert inspect.getsource(i18n.argparse_in_language) == inspect.getsource(lmgrd.i18n.argparse_in_language)
    for msgid in i18n.ARGPARSE_MESSAGES:
        japanese = i18n.catalog("ja").gettext(msgid)
        assert japanese != msgid and JAPANESE.search(japanese), f"client_stub: no Japanese for {msgid!r}"
        assert lmgrd.i18n.catalog("ja").gettext(msgid) == japanese, f"the twins translate {msgid!r} differently"
        assert sorted(_PRINTF.findall(japanese)) == sorted(_PRINTF.findall(msgid)), f"placeholders of {msgid!r}"
        assert japanese.endswith("\n") == msgid.endswith("\n"), msgid
        assert i18n.catalog("en").gettext(msgid) == msgid
