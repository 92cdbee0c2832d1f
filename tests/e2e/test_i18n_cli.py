"""lmclient, lmutil, lmgrd and lmissue as a Japanese user runs them, against the real daemon: ``LMGRD_LANG=ja`` or
``LANG=ja_JP.UTF-8`` gives Japanese messages, ``--help`` and argparse's own usage errors (the server's English
details kept), while ``--json`` and lmstat's FlexNet layout stay English, and ``LMGRD_LANG=en`` wins over a Japanese
locale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from harness import Daemon, RawClient

from client_stub.cli import EXIT_DENIED, EXIT_UNREACHABLE
from protocol import Checkout, Granted

PY = sys.executable
_LOCALE_VARS = ("LANG", "LANGUAGE", "LC_ALL", "LC_MESSAGES", "LMGRD_LANG")
#: The two ways a Japanese user gets Japanese.
JAPANESE_ENVS = {"LMGRD_LANG": {"LMGRD_LANG": "ja"}, "LANG": {"LANG": "ja_JP.UTF-8"}}


def _env(base: dict[str, str], tmp_path: Path, **lang: str) -> dict[str, str]:
    e = {k: v for k, v in base.items() if k not in (*_LOCALE_VARS, "LM_LICENSE_SERVER", "LM_VENDOR_KEY")}
    e["XDG_CONFIG_HOME"] = str(tmp_path / "config")
    e["XDG_DATA_HOME"] = str(tmp_path / "data")
    return {**e, **lang}


def run(module: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", module, *args], capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.parametrize("lang", JAPANESE_ENVS)
def test_lmclient_speaks_japanese_and_keeps_the_servers_detail(daemon_factory: Callable[..., Daemon],
                                                               tmp_path: Path, lang: str) -> None:
    d = daemon_factory((("CADPRO", "2.1", 1),))
    env = _env(d.env(), tmp_path, **JAPANESE_ENVS[lang])
    ok = run("client_stub.cli", env, "checkout", "CADPRO", "--version", "2.1", "-c", d.address)
    assert ok.returncode == 0, ok.stderr
    assert f"ライセンスサーバー {d.address} から CADPRO 2.1 のライセンスを取得しました（カスタマーID CID-" in ok.stdout
    assert ok.stdout.splitlines()[-1] == "ライセンスを返却しました"

    r = run("client_stub.cli", env, "checkout", "NOPE", "--version", "1.0", "-c", d.address)
    assert r.returncode == EXIT_DENIED
    first, hint = r.stderr.splitlines()[:2]
    assert first.startswith("lmclient: UNKNOWN_PRODUCT: ライセンスにこの製品が含まれていません。（詳細: ")
    assert "'NOPE'" in first  # the server's English detail names the product
    assert hint == ("lmclient: 対処方法: この製品を含むライセンスを、ライセンス管理者またはベンダーに"
                    "依頼してください。")
    assert "What to do" not in r.stderr and "what to do" not in r.stderr


def test_lmclient_json_stays_english_and_lmgrd_lang_wins(daemon_factory: Callable[..., Daemon],
                                                         tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),))
    ja = _env(d.env(), tmp_path, LANG="ja_JP.UTF-8")
    human = run("client_stub.cli", ja, "status", "-c", d.address)
    assert human.returncode == 0, human.stderr
    assert human.stdout.startswith("ライセンスサーバー: lmgrd ")
    assert "CADPRO 2.1: 2 ライセンス中 0 使用中、0 待ち（カスタマーID CID-" in human.stdout
    machine = run("client_stub.cli", ja, "status", "--json", "-c", d.address)
    assert machine.returncode == 0 and not any("\u3040" <= ch <= "\u9fff" for ch in machine.stdout)
    assert json.loads(machine.stdout)["pools"][0]["count"] == 2
    shown = run("client_stub.cli", ja, "show", "--json", "-c", d.address)
    assert json.loads(shown.stdout)["source"] == "argument"
    # LMGRD_LANG wins over the locale
    en = run("client_stub.cli", {**ja, "LMGRD_LANG": "en"}, "status", "-c", d.address)
    assert en.stdout.startswith("license server: lmgrd ") and "CADPRO 2.1: 0 of 2 in use, 0 queued" in en.stdout


@pytest.mark.parametrize("lang", JAPANESE_ENVS)
def test_lmclient_unreachable_in_japanese(tmp_path: Path, lang: str) -> None:
    env = _env(dict(os.environ), tmp_path, **JAPANESE_ENVS[lang])
    r = run("client_stub.cli", env, "ping", "-c", "1@127.0.0.1")
    assert r.returncode == EXIT_UNREACHABLE
    assert r.stderr.startswith("lmclient: SERVER_UNAVAILABLE: ライセンスサーバーに接続できません。"
                               "（詳細: cannot connect")
    assert "lmclient: 対処方法: lmgrd が起動していて" in r.stderr


@pytest.mark.parametrize("lang", JAPANESE_ENVS)
def test_lmutil_refusal_in_japanese_json_in_english(daemon_factory: Callable[..., Daemon], tmp_path: Path,
                                                    lang: str) -> None:
    d = daemon_factory()
    env = _env(d.env(), tmp_path, **JAPANESE_ENVS[lang])
    env["LMGRD_RUNTIME_DIR"] = str(d.workdir / "elsewhere")  # no token here: the server refuses
    r = run("lmgrd.lmutil", env, "lmdown", "-c", d.address)
    assert r.returncode == 1
    assert r.stderr.startswith("lmutil lmdown: ライセンスサーバーが管理者の認証情報を受け付けませんでした。（詳細: "
                               "NOT_AUTHORIZED: ")
    j = run("lmgrd.lmutil", env, "lmdown", "--json", "-c", d.address)
    data = json.loads(j.stdout)
    assert data["error"] == "NOT_AUTHORIZED" and data["message"].startswith("NOT_AUTHORIZED: ")
    assert data["message"].isascii()
    assert d.proc is not None and d.proc.poll() is None  # refused: still running


def test_lmutil_usage_error_in_japanese(tmp_path: Path) -> None:
    env = _env(dict(os.environ), tmp_path, LMGRD_LANG="ja")
    r = run("lmgrd.lmutil", env, "lmremove", "-c", "nonsense")
    assert r.returncode == 2
    assert r.stderr.strip() == ("lmutil lmremove: ライセンスサーバーの指定 'nonsense' を読み取れません。PORT@HOST の形 "
                                "(例: 27000@licsrv01) で指定してください。")


def test_lmstat_layout_and_its_down_line_stay_english(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 3),))
    outs = {}
    for name, lang in (("ja", {"LANG": "ja_JP.UTF-8", "LMGRD_LANG": "ja"}), ("en", {"LANG": "C.UTF-8"})):
        r = run("lmgrd.lmutil", _env(d.env(), tmp_path, **lang), "lmstat", "-a", "-c", d.address)
        assert r.returncode == 0, r.stderr
        outs[name] = [ln for ln in r.stdout.splitlines() if "status on" not in ln]  # the minute may tick over
    assert outs["ja"] == outs["en"] and any("Users of CADPRO:" in ln for ln in outs["ja"])
    address = d.address
    d.stop()
    ja_env = _env(d.env(), tmp_path, LMGRD_LANG="ja")
    down = run("lmgrd.lmutil", ja_env, "lmstat", "-a", "-c", address)
    assert down.returncode == 3
    assert "Error getting status: Cannot connect to license server system." in down.stdout  # FlexNet's, for checks
    assert "ライセンスサーバー " in down.stderr and "に接続できません" in down.stderr


def _japanese(text: str) -> bool:
    return any("\u3040" <= ch <= "\u9fff" for ch in text)


HELP_CASES = [  # (module, args, the Japanese environment, a Japanese phrase of that help, the English one)
    ("lmgrd.lmutil", ["lmstat", "--help"], "LMGRD_LANG", "すべての製品とその使用者",
     "all products, with their holders"),
    ("lmgrd.lmutil", ["lmremove", "--help"], "LANG", "FlexNet の形式: lmremove -h", "FlexNet's form: lmremove -h"),
    ("lmgrd.cli", ["--help"], "LANG", "クライアント用の TCP ポート", "TCP port for clients"),
    ("lmgrd.vendor.lmissue", ["reissue", "--help"], "LMGRD_LANG", "取り消しを追加する取り消しリスト",
     "the revocation list to add the revocation to"),
    ("client_stub.cli", ["checkout", "--help"], "LANG", "製品のバージョン", "the product's version"),
    ("lmgrd.lmutil", ["cloud-check", "--help"], "LMGRD_LANG", "このマシンからベンダーのアクティベーションサービス",
     "can this machine reach"),
    ("lmgrd.lmutil", ["activate", "--help"], "LANG", "インターネットのないサイト向け", "for a site without internet"),
    ("lmgrd.cli", ["--help"], "LMGRD_LANG", "ライセンスの保存先", "where seats live"),
]


@pytest.mark.parametrize(("module", "args", "env", "ja", "en"), HELP_CASES,
                         ids=[f"{m} {' '.join(a)}" for m, a, *_ in HELP_CASES])
def test_help_is_in_the_users_language(tmp_path: Path, module: str, args: list[str], env: str, ja: str,
                                       en: str) -> None:
    r = run(module, _env(dict(os.environ), tmp_path, **JAPANESE_ENVS[env]), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("使い方: ") and ja in r.stdout, r.stdout
    assert "オプション:" in r.stdout and "このヘルプを表示して終了します" in r.stdout
    assert "usage:" not in r.stdout and "show this help message" not in r.stdout
    # English without a Japanese locale, and when LMGRD_LANG=en overrides one
    lang = {"LANG": "C.UTF-8"} if env == "LANG" else {"LANG": "ja_JP.UTF-8", "LMGRD_LANG": "en"}
    r = run(module, _env(dict(os.environ), tmp_path, **lang), *args)
    assert r.returncode == 0 and r.stdout.startswith("usage: ") and en in r.stdout, r.stdout
    assert not _japanese(r.stdout)


def test_usage_errors_of_argparse_are_in_japanese(tmp_path: Path) -> None:
    env = _env(dict(os.environ), tmp_path, LMGRD_LANG="ja")
    r = run("lmgrd.lmutil", env, "lmstat", "-t", "soon")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "lmutil lmstat: エラー: 引数 -t: float の値として正しくありません: 'soon'"
    r = run("lmgrd.vendor.lmissue", env, "revoke", "CID-AAAA-BBBB-CCCC-DDDD")
    assert r.returncode == 2 and "エラー: 次の引数が必要です: --key, --out" in r.stderr
    r = run("client_stub.cli", env, "frobnicate")
    assert r.returncode == 2 and "エラー: 引数 COMMAND: 選べない値です: 'frobnicate'" in r.stderr


def test_lmutil_success_lines_in_japanese_json_in_english(daemon_factory: Callable[..., Daemon],
                                                          tmp_path: Path) -> None:
    d = daemon_factory((("CADPRO", "2.1", 2),))
    env = _env(d.env(), tmp_path, LANG="ja_JP.UTF-8")
    c = RawClient(d.port)
    c.hello(user="bob", host="pc2")
    assert isinstance(c.request(Checkout(c.id(), "CADPRO", "2.1", 0)), Granted)
    r = run("lmgrd.lmutil", env, "lmremove", "CADPRO", "bob", "pc2", "-c", d.address)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("bob@pc2 の CADPRO のライセンスを解放しました（リース ")
    assert "そのクライアントには次のハートビートで伝えられます" in r.stdout
    r = run("lmgrd.lmutil", env, "lmreread", "-c", d.address)
    assert r.returncode == 0 and r.stdout.startswith("再読み込みしました: 1 件のライセンスを提供中: "), r.stdout
    j = run("lmgrd.lmutil", env, "lmreread", "--json", "-c", d.address)
    assert json.loads(j.stdout)["reloaded"] is True and not _japanese(j.stdout)
    r = run("lmgrd.lmutil", env, "lmhostid", "-c", d.address)
    assert r.returncode == 0 and "ホスト名: " in r.stdout and "短いホスト名: " in r.stdout
    r = run("lmgrd.lmutil", env, "lmdown", "-c", d.address)
    assert r.returncode == 0
    assert r.stdout.strip() == "ライセンスサーバーは停止中です。再起動に備えて 0 件のリースを保存しました"
    assert d.proc is not None and d.proc.wait(10) == 0


def test_lmgrd_check_summary_in_japanese(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory(start=False)
    r = subprocess.run([*d.args(), "--check"], capture_output=True, text=True, timeout=60,
                       env=_env(d.env(), tmp_path, LMGRD_LANG="ja"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "設定とライセンスに問題はありません"
    assert r.stdout.startswith("ok: ")  # the per-file lines keep their English labels (scripts grep them)


def _usage_event(hours: float, event: str, user: str, **kw: object) -> dict[str, object]:
    t = datetime(2024, 4, 1, tzinfo=UTC).timestamp() + hours * 3600
    return {"ts": datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z"), "epoch": t, "event": event,
            "customer_id": "CID-A", "product": "CADPRO", "version": "2.1", "user": user, "host": "pc-" + user, **kw}


def test_lmutil_report_text_in_japanese_json_in_english(tmp_path: Path) -> None:
    # CADPRO, 1 seat: alice holds it from 0 to 2 h, bob is denied at 1 h
    events = [_usage_event(0, "checkout", "alice", lease="a1", count=1, in_use=1),
              _usage_event(1, "denial", "bob", reason="NO_SEATS"),
              _usage_event(2, "checkin", "alice", lease="a1", in_use=0, held_s=7200)]
    log = tmp_path / "usage.log"
    log.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    ja = run("lmgrd.lmutil", _env(dict(os.environ), tmp_path, LMGRD_LANG="ja"), "report", str(log))
    assert ja.returncode == 0, ja.stderr
    assert ja.stdout.startswith("利用レポート 2024-04-01T00:00:00Z .. 2024-04-01T02:00:00Z（2.0 時間）: "
                                "1 個のファイル、3 件のイベント\n"), ja.stdout
    assert "CADPRO（カスタマーID CID-A）: 1 ライセンス\n" in ja.stdout
    assert "  チェックアウト 1 回、拒否: NO_SEATS 1\n" in ja.stdout
    assert ("  -> ピーク 1（1 ライセンス中）、上限到達 2.0 時間、NO_SEATS による拒否 1 回: ライセンスの追加購入を"
            "検討してください") in ja.stdout
    j = run("lmgrd.lmutil", _env(dict(os.environ), tmp_path, LMGRD_LANG="ja"), "report", "--json", str(log))
    assert not _japanese(j.stdout)
    assert json.loads(j.stdout)["products"][0]["recommendation"] == (
        "peak 1 of 1, at the limit 2.0 h, 1 NO_SEATS denials: consider buying more seats")
    en = run("lmgrd.lmutil", _env(dict(os.environ), tmp_path, LANG="ja_JP.UTF-8", LMGRD_LANG="en"), "report",
             str(log))
    assert en.returncode == 0 and not _japanese(en.stdout), en.stdout
    assert "CADPRO (customer CID-A): 1 seats\n  peak 1, 95th percentile 1, at the limit 2.0 h" in en.stdout
