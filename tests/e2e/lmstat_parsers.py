"""Open-source consumers of FlexNet ``lmstat`` text, as the tests run them against ``lmutil lmstat``.

Tools that are packaged are installed and run unchanged (``.ci/install-deps.sh``): Debian's ``check_flexlm``
(monitoring-plugins-standard) and the lmstat parser of license-manager-agent (PyPI). The others are Go or
JavaScript programs that are on no registry this project uses; their patterns are copied here verbatim, each
with its source, and driven the way their program drives them. Go's POSIX classes, which Python's ``re`` lacks,
are spelled out: ``[:print:]`` is ``\\x20-\\x7e`` and ``[:graph:]`` is ``\\x21-\\x7e``; nothing else is changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
LM_AGENT_DIR = REPO / ".ci" / "parsers"
CHECK_FLEXLM = Path("/usr/lib/nagios/plugins/check_flexlm")


# --------------------------------------------------------------------------- mjtrangoni/flexlm_exporter
# Prometheus exporter, Apache-2.0. Patterns from collector/regexp.go; the walk over the lines mirrors
# parseLmstatLicenseInfoServer, parseLmstatLicenseInfoVendor and parseLmstatLicenseInfoFeature in
# collector/lmstat_linux.go (the output is read with encoding/csv, which drops blank lines and renames
# repeated lines; we drop blank lines the same way).
_P = r"\x20-\x7e"  # [:print:]
_G = r"\x21-\x7e"  # [:graph:]
EXPORTER = {
    "version": re.compile(r"^lmstat (?P<version>v[\d\.]+) build (?P<build>\d+) (?P<arch>[\w]+)"),
    "servers": re.compile(r"^License server status: (?P<servers>[\w,.@\-]+)"),
    "server_status": re.compile(r"(?P<fqdn>[\w\.\-]+): license server (?P<status>\w+)(?P<master>\s"
                                r"\(MASTER\))? (?P<version>v[\d\.]+)$"),
    "vendor_status": re.compile(r"^\s+(?P<vendor>\w+): (?P<status>UP|DOWN) (?P<version>v[\d\.]+)$"),
    "feature_usage": re.compile(r"^Users of (?P<name>.*):\s+\(Total of (?P<issued>\d+) \w+ issued\;\s+"
                                r"Total of (?P<used>\d+) \w+ in use\)$"),
    "user": re.compile(rf"^\s+(?P<user>[\w{_P}]+) [\w\-\.]+ [{_P}]+ (?P<ver>\(v[\w\.]+\)) \([\w\-\.]+\/\d+ "
                       r"\d+\)\, start (?P<since>\w+ \d+\/\d+ \d+\:\d+)(\,\s(?P<licenses>\d+)\s\w+|)"
                       r"(\s+\(linger\:\s\d+\s\/\s\d+\))?"
                       r"(\,\s+PID\:\s+\d+\s?)?$"),
    "group_reserv": re.compile(r"^(\s+|)(?P<reservation>\d+)\s+\w+\s+for\s+(HOST_GROUP|GROUP)\s+"
                               r"(?P<group>\w+).*$"),
    "feature_exp": re.compile(rf"^(?P<feature>[{_G}]+)\s+(?P<version>[\d\.]+)\s+"
                              r"(?P<licenses>\d+)\s+(?P<expires>[\w\-]+)\s+(?P<vendor>\w+)$"),
}


def exporter_parse(text: str) -> dict[str, Any]:
    """What flexlm_exporter exports from ``lmstat -a`` text: servers, vendors, features (issued, used),
    licenses per user per feature, reserved seats per group per feature."""
    servers: dict[str, dict[str, Any]] = {}
    vendors: dict[str, dict[str, Any]] = {}
    features: dict[str, dict[str, float]] = {}
    users: dict[str, dict[str, float]] = {}
    groups: dict[str, dict[str, float]] = {}
    feature = ""
    for line in (x for x in text.splitlines() if x.strip()):
        if m := EXPORTER["servers"].search(line):
            for port_server in m["servers"].split(","):
                port, fqdn = port_server.split("@")
                servers[fqdn.split(".")[0]] = {"fqdn": fqdn, "port": port, "status": False, "master": False}
        elif m := EXPORTER["server_status"].search(line):
            s = servers[m["fqdn"].split(".")[0]]  # a KeyError here is the exporter's nil-pointer panic
            s.update(version=m["version"], status=m["status"] == "UP", master=m["master"] == " (MASTER)")
        if m := EXPORTER["vendor_status"].search(line):
            vendors[m["vendor"]] = {"status": m["status"] == "UP", "version": m["version"]}
        if m := EXPORTER["feature_usage"].search(line):
            feature = m["name"]
            features[feature] = {"issued": float(m["issued"]), "used": float(m["used"])}
        elif m := EXPORTER["user"].search(line):
            per = users.setdefault(feature, {})
            per[m["user"]] = per.get(m["user"], 0.0) + (float(m["licenses"]) if m["licenses"] else 1.0)
        elif m := EXPORTER["group_reserv"].search(line):
            groups.setdefault(feature, {})[m["group"]] = float(m["reservation"])
    return {"servers": servers, "vendors": vendors, "features": features, "users": users, "groups": groups}


# --------------------------------------------------------------------------- quantumhpc/flexlmjs
# Node.js module, MIT. Patterns from flexjs.js (JavaScript regex literals; the syntax used is Python's too);
# the loop mirrors its lmstat(): a "Users of" line opens a feature, a `"F" vX, vendor: V, expiry: E` line
# gives the vendor, version and expiry of the user lines that follow (flexjs.js reads vendorInfo.name of an
# undefined vendorInfo, a TypeError, when no such line came first).
JS_FEATURE = re.compile(r"^Users of ([^:]*):[^0-9:]*([0-9]+)[^0-9]*([0-9]+)[^0-9]*([\)]+)")
JS_VERSION_TOKEN = re.compile(r"\s*([^\s]*)\s+([^\s,]*),\s+([^\s]*)\s+([^\s,]*),\s+([^\s]*)\s+([^\s,]*)")
JS_USER_TOKEN = re.compile(r"([^\s]*)\s+([^\s]*)\s+([^\s]*)\s+\(([^\s]*)\)\s+\(([^\)]*)\),\s+([^\s]*)\s(.*)")


def flexlmjs_parse(text: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    token_feature = None
    vendor: dict[str, str] | None = None
    for line in text.split("\n"):
        if m := JS_FEATURE.match(line):
            token_feature = m[1]
            result[token_feature] = {"total": m[2], "used": m[3], "free": int(m[2]) - int(m[3]), "tokens": []}
        elif m := JS_VERSION_TOKEN.search(line):
            vendor = {"name": m[4], "version": m[2], "expiry": m[6]}
        elif m := JS_USER_TOKEN.search(line):
            if vendor is None:
                raise TypeError("Cannot read properties of undefined (reading 'name')")
            result[token_feature]["tokens"].append({"username": m[1], "machine": m[2], "started": m[7],
                                                    "vendorname": vendor["name"], "version": vendor["version"],
                                                    "expiry": vendor["expiry"]})
    return result


# --------------------------------------------------------------------------- AmberDante/flexlm-stat-json
# Zabbix helper (Go, main.go) that turns `lmutil lmstat -a` into JSON by the layout alone: it cuts the text at
# "[Detecting lmgrd processes...]\n", "Feature usage info:", "Users of " and blank lines ("\n\n"), then splits
# user lines at spaces. Re-done here step for step (getLicenseServersInfo, parseServerInfo, getFeatureData,
# parseFeatureData, getUsersData, parseUserData); an IndexError is its "index out of range" panic.
def stat_json_parse(text: str) -> dict[str, Any]:
    server_info, feature_info = text.split("Feature usage info:")[:2]
    server_info = server_info.strip("\n ")
    delim = "[Detecting lmgrd processes...]\n"
    server_info = server_info[server_info.find(delim) + len(delim):]
    part = server_info.split("\n\n")
    server = part[0][part[0].find(": ") + 2:part[0].find("\n")]
    i1 = part[1].find(": license server ") + len(": license server ")
    status = part[1][i1:i1 + part[1][i1:].find(" ")]
    version = part[1][part[1].rfind(" ") + 1:]
    vendor = part[3].strip("\n ").split(" ")
    out: dict[str, Any] = {"server": server, "server_status": status, "server_version": version,
                           "vendor": vendor[0] if len(vendor) == 3 else "",
                           "vendor_status": vendor[1] if len(vendor) == 3 else "", "feature_usage": []}
    features = feature_info.split("Users of ")
    if not features[0]:
        features = features[1:]
    for data in features:
        pieces = data.strip("\n \t").split("\n\n")
        head, users = (pieces[0], pieces[2]) if len(pieces) > 1 else (pieces[0], "")
        head = head.strip("\n \t")
        entry: dict[str, Any] = {"feature": "", "users": []}
        if head:
            i2 = head.find(":")
            entry["feature"] = head[:i2]
            i1 = i2 + head[i2:].find("(Total of ") + len("(Total of ")
            i2 = i1 + head[i1:].find(" license")
            entry["issued_lics"] = head[i1:i2]
            i1 = i2 + head[i2:].find(";  Total of ") + len(";  Total of ")
            i2 = i1 + head[i1:].find(" license")
            entry["used_lics"] = head[i1:i2]
        for u in users.strip("\n \t").split("\n"):
            u = u.strip("\n \t")
            if not u:
                continue
            cols = [c.strip("(),") for c in u.split(" ")]
            host, port = cols[4].split("/")[:2]  # IndexError where the 5th word has no "/"
            entry["users"].append({"userid": cols[0], "host": cols[1], "display": cols[2], "server_host": host,
                                   "server_port": port})
        out["feature_usage"].append(entry)
    return out


# --------------------------------------------------------------------------- license-manager-agent (PyPI)
def lm_agent_parse(text: str) -> dict[str, Any]:
    """``lm_agent.parsing.flexlm.parse`` of the installed package, in a subprocess (its own import path)."""
    if not (LM_AGENT_DIR / "lm_agent" / "parsing" / "flexlm.py").is_file():
        raise FileNotFoundError(f"license-manager-agent is not installed in {LM_AGENT_DIR}; run .ci/install-deps.sh")
    code = "import json, sys\nfrom lm_agent.parsing import flexlm\nprint(json.dumps(flexlm.parse(sys.stdin.read())))"
    r = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(LM_AGENT_DIR)})
    assert r.returncode == 0, r.stderr
    parsed: dict[str, Any] = json.loads(r.stdout)
    return parsed
