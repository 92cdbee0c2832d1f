"""``lmissue``: the vendor's tool to make keys, issue, inspect, revoke and reissue signed licenses.

Runs on the vendor's machine, never on a customer's: it is the only program that touches the vendor's
private key. The license format, its rules and its verification live in ``protocol.license``; signing,
private keys, customer IDs and request checking in ``lmgrd.vendor.signing``; this module does the file
work and the wording. Exit codes: 0 success, 1 a problem (explained on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from lmgrd.core.documents import load_yaml
from lmgrd.storage.atomic import write_atomic
from lmgrd.storage.files import read_public_key_file
from lmgrd.vendor.signing import (
    CUSTOMER_ID_RANDOM_BYTES,
    RequestSpec,
    check_request,
    dump_private_key,
    dump_public_key,
    load_private_key,
    new_customer_id,
    sign_license,
    sign_revocation,
)
from protocol.errors import ProtocolError
from protocol.license import (
    License,
    Revocation,
    customer_id_problem,
    document_kind,
    entry_source,
    parse_license,
    parse_revocation,
    split_revocation_list,
    verify_license,
    verify_revocation,
    verify_revocation_list,
)

__all__ = ["main"]

_MAX_REQUEST_BYTES = 1_000_000
_MAX_KEY_BYTES = 64 * 1024

_DESCRIPTION = """\
Issue signed licenses for lmgrd (the vendor's tool).

  lmissue keygen --out keys/                        make the vendor key pair (once)
  lmissue issue request.yaml --key keys/vendor.key --out customer.lic
  lmissue show customer.lic --vendor-key keys/vendor.pub
  lmissue revoke CID-XXXX-XXXX-XXXX-XXXX --key keys/vendor.key --out customer.revoked   (adds to it)
  lmissue reissue old.lic request.yaml --key keys/vendor.key --out new.lic

Keep vendor.key secret: whoever has it can issue licenses. Give vendor.pub to the license server
(lmgrd --vendor-key) and ship it with your products.
"""

_REQUEST_HELP = """\
The registration request is YAML:

  license_type: multi            # multi (floating, license server) | single (node-locked PC)
  customer: Example Engineering Tokyo
  host: {hostname: licsrv01, ip: 192.0.2.10}   # the license server (multi) or the PC (single)
  # or, for an HA license served by 2 or 3 lmgrd nodes on one etcd cluster (each serves it only if it is one):
  # hosts: [{hostname: lic1, ip: 192.0.2.11}, {hostname: lic2, ip: 192.0.2.12}, {hostname: lic3, ip: 192.0.2.13}]
  products:
    - {name: CADPRO, version: "2.1", count: 25}
  expires: 2027-12-31            # optional; omit for no expiry
  site_networks: [192.0.2.0/24]  # optional
  share: user_host               # optional: user_host (default) | host | none
  cloud_url: https://activation.vendor.example   # optional: the activation service (lmcloud) decides

Quote versions ("2.10"): unquoted, YAML reads 2.10 as the number 2.1. Every problem in the request
is listed at once, one line per field; nothing is written unless the request is correct.
"""


class _Failure(Exception):
    """A problem already worded for the user; main() prints it and exits 1."""


# --------------------------------------------------------------------------------------------------
# Small file helpers


def _read_bytes(path: str, what: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise _Failure(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise _Failure(f"{path}: too large to be a {what}")
    return data


def _read_text(path: str, what: str) -> str:
    data = _read_bytes(path, what, _MAX_REQUEST_BYTES * 4)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Failure(f"{path}: the {what} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _load_private(path: str) -> Ed25519PrivateKey:
    try:
        return load_private_key(_read_bytes(path, "vendor private key", _MAX_KEY_BYTES), path)
    except ProtocolError as exc:
        raise _Failure(_explain(exc)) from None


def _load_public(path: str) -> Ed25519PublicKey:
    try:
        return read_public_key_file(path)
    except ProtocolError as exc:
        raise _Failure(_explain(exc)) from None


def _explain(exc: ProtocolError) -> str:
    return exc.message + (f"\n  what to do: {exc.hint}" if exc.hint else "")


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise _Failure(f"{path}: already exists; not overwriting it (use --force to replace it)")


def _write_text(path: Path, text: str, force: bool) -> None:
    """Write ``text`` to ``path`` completely or not at all.

    Without ``force`` an existing file (even one created meanwhile) is never replaced; with ``force`` the
    new file is renamed over it (see :func:`lmgrd.storage.atomic.write_atomic`).
    """
    try:
        write_atomic(path, text.encode("utf-8"), mode=0o644, replace=force)
    except FileExistsError:
        raise _Failure(f"{path}: already exists; not overwriting it (use --force to replace it)") from None
    except OSError as exc:
        raise _Failure(f"{path}: cannot write: {exc.strerror or exc}") from None


def _load_request(path: str) -> object:
    text = _read_text(path, "registration request")
    try:
        return load_yaml(text, path)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise _Failure(f"{path}: not valid YAML{where}: {problem}") from None


def _spec_from_request(path: str) -> RequestSpec:
    """Check the request file; returns the spec or raises _Failure listing every problem."""
    data = _load_request(path)
    spec, problems = check_request(data, datetime.now(UTC).date())
    if problems or spec is None:
        lines = [f"{path}: {len(problems)} problem(s) in the registration request; nothing was written:"]
        lines += [f"  {p.path}: {p.message}" for p in problems]
        raise _Failure("\n".join(lines))
    return spec


# --------------------------------------------------------------------------------------------------
# Summaries


def _license_summary(lic: License) -> list[str]:
    kind = "multi (floating, served by lmgrd)" if lic.license_type == "multi" else "single (node-locked to one PC)"
    lines = [
        f"customer ID:   {lic.customer_id}",
        f"license type:  {kind}",
        f"customer:      {lic.customer}",
        f"host:          {lic.hostname} ({lic.ip})" if not lic.servers else
        "hosts (HA):    " + ", ".join(f"{n} ({ip})" for n, ip in lic.servers),
        f"issued at:     {lic.issued_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        f"expires:       {lic.expires.isoformat() + ' (end of day, UTC)' if lic.expires else 'never'}",
        f"share:         {lic.share}",
        f"site networks: {', '.join(lic.site_networks) if lic.site_networks else '(none: private LAN addresses)'}",
        "products:",
    ]
    lines += [f"  {p.name:<20} version <= {p.version:<10} seats {p.count}" for p in lic.products]
    if lic.cloud_url is not None:
        lines.append(f"activation:    by the vendor's activation service {lic.cloud_url}")
    return lines


def _revocation_summary(rev: Revocation) -> list[str]:
    return [
        f"revokes:       {rev.customer_id}",
        f"revoked at:    {rev.revoked_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        f"replaced by:   {rev.replaced_by or '(nothing)'}",
        f"reason:        {rev.reason}",
    ]


# --------------------------------------------------------------------------------------------------
# Subcommands


def _cmd_keygen(args: argparse.Namespace, out: TextIO) -> int:
    directory = Path(args.out)
    key_path, pub_path = directory / "vendor.key", directory / "vendor.pub"
    existing = [str(p) for p in (key_path, pub_path) if p.exists() or p.is_symlink()]
    if existing:
        raise _Failure(
            f"{' and '.join(existing)} already {'exists' if len(existing) == 1 else 'exist'}; "
            "lmissue keygen never overwrites a vendor key "
            "(every license signed with it would become unverifiable). Choose another --out directory, "
            "or move the old keys away yourself if you really mean to replace them."
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _Failure(f"{directory}: cannot create the directory: {exc.strerror or exc}") from None
    private = Ed25519PrivateKey.generate()
    # O_EXCL: a key that appeared since the check above is still never overwritten. 0600 from the
    # start (not chmod later), so the private key is never readable by others, even for a moment.
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise _Failure(f"{key_path}: already exists; never overwriting a vendor key") from None
    except OSError as exc:
        raise _Failure(f"{key_path}: cannot create: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # in case the umask is unusual; never wider than 0600
        f.write(dump_private_key(private))
        f.flush()
        os.fsync(f.fileno())
    try:
        fd = os.open(pub_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise _Failure(
            f"{pub_path}: cannot create ({exc.strerror or exc}); {key_path} was written, and the public key "
            "can be derived from it"
        ) from None
    with os.fdopen(fd, "wb") as f:
        f.write(dump_public_key(private.public_key()))
    print(f"wrote {key_path}  (vendor PRIVATE key, mode 0600: keep it secret and back it up)", file=out)
    print(f"wrote {pub_path}  (vendor public key: give it to lmgrd --vendor-key and ship it with products)", file=out)
    return 0


def _issue(spec: RequestSpec, private: Ed25519PrivateKey, now: datetime) -> tuple[License, str]:
    lic = spec.to_license(new_customer_id(os.urandom(CUSTOMER_ID_RANDOM_BYTES)), now)
    return lic, sign_license(lic, private)


def _cmd_issue(args: argparse.Namespace, out: TextIO) -> int:
    out_path = Path(args.out)
    spec = _spec_from_request(args.request)
    private = _load_private(args.key)
    _refuse_existing([out_path], args.force)
    lic, text = _issue(spec, private, datetime.now(UTC))
    _write_text(out_path, text, args.force)
    print(f"wrote {out_path}", file=out)
    for line in _license_summary(lic):
        print(line, file=out)
    if args.register:
        print(_register(args.register, text, str(out_path)), file=out)
    print(lic.customer_id, file=out)  # alone on the last line: scripts read it there
    return 0


def _register(db_url: str, text: str, source: str) -> str:
    """``lmissue issue --register DB_URL``: record the new customer ID with the activation service (lmcloud)."""
    try:
        from lmgrd.vendor.lmcloud.commands import register_license_text
    except ImportError as exc:
        raise _Failure(f"--register needs the activation service's packages ({exc.name} is missing): "
                       "pip install 'lmgrd[cloud]'; the license was written, register it later with "
                       f"lmcloud register {source}") from None
    try:
        return register_license_text(db_url, text, source)
    except Exception as exc:  # the lmcloud error is already worded for the user
        raise _Failure(f"{exc}\n  the license was written; register it later with: lmcloud register {source} "
                       f"--db {db_url}") from None


def _show_revocation_list(args: argparse.Namespace, text: str, public: Ed25519PublicKey | None,
                          key_path: str | None, out: TextIO) -> int:
    """``lmissue show`` of a file holding several revocations: every entry, each checked on its own."""
    entries = split_revocation_list(text)
    print(f"{args.file}: signed revocation list, {len(entries)} revocations", file=out)
    failed: list[str] = []
    for entry in entries:
        source = entry_source(args.file, entry, len(entries))
        print(f"\nentry {entry.number} (line {entry.first_line}):", file=out)
        try:
            rev, _ = parse_revocation(entry.text, source)
        except ProtocolError as exc:
            print("signature:     NOT VALID (the entry cannot even be read as a revocation)", file=out)
            failed.append(_explain(exc))
            continue
        for line in _revocation_summary(rev):
            print(line, file=out)
        if public is None:
            continue
        try:
            verify_revocation(entry.text, public, source)
        except ProtocolError as exc:
            print(f"signature:     DOES NOT VERIFY with {key_path}", file=out)
            failed.append(_explain(exc))
            continue
        print(f"signature:     OK (verified with {key_path})", file=out)
    if public is None:
        print("\nsignatures:    not checked (pass --vendor-key vendor.pub, or set LM_VENDOR_KEY, to verify them)",
              file=out)
    if failed:
        raise _Failure(f"{len(failed)} of {len(entries)} revocations in {args.file} are refused (the others are "
                       "valid):\n" + "\n".join(failed))
    return 0


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    text = _read_text(args.file, "license")
    key_path = args.vendor_key or os.environ.get("LM_VENDOR_KEY") or None
    public = _load_public(key_path) if key_path else None
    kind = document_kind(text) or "license"
    if kind == "revocation" and len(split_revocation_list(text)) > 1:
        return _show_revocation_list(args, text, public, key_path, out)
    try:
        if kind == "revocation":
            rev, _ = parse_revocation(text, args.file)
            print(f"{args.file}: signed revocation", file=out)
            for line in _revocation_summary(rev):
                print(line, file=out)
        else:
            lic, _ = parse_license(text, args.file)
            print(f"{args.file}: license", file=out)
            for line in _license_summary(lic):
                print(line, file=out)
    except ProtocolError as exc:
        raise _Failure(f"{_explain(exc)}\nsignature: NOT VALID (the file cannot even be read as a {kind})") from None
    if public is None:
        print(
            "signature:     not checked (pass --vendor-key vendor.pub, or set LM_VENDOR_KEY, to verify it)",
            file=out,
        )
        return 0
    try:
        if kind == "revocation":
            verify_revocation(text, public, args.file)
        else:
            verify_license(text, public, args.file)
    except ProtocolError as exc:
        print(f"signature:     DOES NOT VERIFY with {key_path}", file=out)
        raise _Failure(_explain(exc)) from None
    print(f"signature:     OK (verified with {key_path})", file=out)
    return 0


def _revocation(customer_id: str, reason: str, replaced_by: str | None, now: datetime) -> Revocation:
    try:
        return Revocation(customer_id=customer_id, revoked_at=now, reason=reason, replaced_by=replaced_by)
    except ValueError as exc:
        raise _Failure(str(exc)) from None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the directory of ``path``, so two ``lmissue revoke`` runs on one file never
    both read the old list and each write it back with only their own entry added (the file itself cannot
    carry the lock: write_atomic replaces it by a new inode)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the vendor runs one lmissue at a time there
        yield
        return
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError as exc:
        raise _Failure(f"{parent}: cannot open the directory of --out: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _existing_revocations(path: Path, public: Ed25519PublicKey) -> tuple[str, list[Revocation]]:
    """The text and the revocations of the list at ``path``; refuses one that is not all ours and intact."""
    text = _read_text(str(path), "revocation list")
    kind = document_kind(text)
    if kind != "revocation":
        raise _Failure(f"{path}: exists and is {'a ' + kind + ' file' if kind else 'not a revocation list'}; "
                       "not adding a revocation to it (choose another --out)")
    revs, refused = verify_revocation_list(text, public, str(path))
    if refused:
        raise _Failure(f"{path}: {len(refused)} of its entries do not verify with this --key, so nothing was "
                       "added (fix or move the file first; lmissue show lists them):\n"
                       + "\n".join(_explain(e) for e in refused))
    return text, revs


def _cmd_revoke(args: argparse.Namespace, out: TextIO) -> int:
    problem = customer_id_problem(args.customer_id)
    if problem:
        raise _Failure(problem)
    rev = _revocation(args.customer_id, args.reason, None, datetime.now(UTC))
    private = _load_private(args.key)
    out_path = Path(args.out)
    if args.force:
        print("lmissue: --force no longer replaces a revocation list (that would un-revoke every earlier entry); "
              "the revocation is added to it", file=sys.stderr)
    with _locked(out_path):
        if out_path.exists():
            text, revs = _existing_revocations(out_path, private.public_key())
            same = next((i for i, r in enumerate(revs, start=1) if r.customer_id == rev.customer_id), None)
            if same is not None:
                print(f"{out_path}: {rev.customer_id} is already revoked there (entry {same} of {len(revs)}, "
                      f"revoked at {revs[same - 1].revoked_at:%Y-%m-%d %H:%M:%S} UTC); nothing was written", file=out)
                return 0
            # Earlier entries are kept byte for byte: each carries its own signature.
            new_text = text + ("" if text.endswith("\n") else "\n") + "\n" + sign_revocation(rev, private)
            count = len(revs) + 1
        else:
            new_text, count = sign_revocation(rev, private), 1
        try:
            write_atomic(out_path, new_text.encode("utf-8"), replace=count > 1)
        except FileExistsError:
            raise _Failure(f"{out_path}: appeared while writing; run the command again to add to it") from None
        except OSError as exc:
            raise _Failure(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    print(f"{'added to' if count > 1 else 'wrote'} {out_path} ({count} revocation{'s' if count > 1 else ''} in it)",
          file=out)
    for line in _revocation_summary(rev):
        print(line, file=out)
    print("give this file to the license server (lmgrd --revocations FILE, or drop it into its revocations "
          "directory) and run lmutil lmreread to stop serving it", file=out)
    return 0


def _revoked_path(out_path: Path) -> Path:
    return out_path.with_suffix(".revoked") if out_path.suffix else out_path.with_name(out_path.name + ".revoked")


def _cmd_reissue(args: argparse.Namespace, out: TextIO) -> int:
    private = _load_private(args.key)
    # The old license must be one of ours: verify it with the public half of the signing key.
    try:
        old = verify_license(_read_text(args.old, "license"), private.public_key(), args.old)
    except ProtocolError as exc:
        raise _Failure(_explain(exc)) from None
    spec = _spec_from_request(args.request)
    out_path = Path(args.out)
    revoked_path = _revoked_path(out_path)
    _refuse_existing([out_path, revoked_path], args.force)
    now = datetime.now(UTC)
    lic, text = _issue(spec, private, now)
    reason = args.reason or f"reissued as {lic.customer_id}"
    rev = _revocation(old.customer_id, reason, lic.customer_id, now)
    # The revocation first: a new license without the revocation of the old one would leave both live.
    _write_text(revoked_path, sign_revocation(rev, private), args.force)
    _write_text(out_path, text, args.force)
    print(f"wrote {revoked_path}  (revokes {old.customer_id}; give it to the license server)", file=out)
    print(f"wrote {out_path}", file=out)
    for line in _license_summary(lic):
        print(line, file=out)
    print(lic.customer_id, file=out)  # alone on the last line: scripts read it there
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmissue", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    keygen = sub.add_parser(
        "keygen",
        help="create the vendor key pair (vendor.key, vendor.pub)",
        description="Create DIR/vendor.key (Ed25519 private key, PEM PKCS8, mode 0600) and DIR/vendor.pub "
        "(public key, PEM). Existing key files are never overwritten.",
    )
    keygen.add_argument("--out", required=True, metavar="DIR", help="directory for vendor.key and vendor.pub")
    keygen.set_defaults(func=_cmd_keygen)

    issue = sub.add_parser(
        "issue",
        help="turn a registration request into a signed license",
        description="Check REQUEST.yaml, then write a signed license with a new customer ID.\n"
        "The customer ID is printed alone on the last line of the output (scripts read it there).",
        epilog=_REQUEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    issue.add_argument("request", metavar="REQUEST.yaml", help="the registration request (YAML)")
    issue.add_argument("--key", required=True, metavar="vendor.key", help="the vendor private key")
    issue.add_argument("--out", required=True, metavar="FILE.lic", help="where to write the license")
    issue.add_argument("--force", action="store_true", help="replace --out if it exists")
    issue.add_argument("--register", metavar="DB_URL", help="also record the new customer ID in the activation "
                       "service's database (as lmcloud register FILE.lic --db DB_URL); needs lmgrd[cloud]")
    issue.set_defaults(func=_cmd_issue)

    show = sub.add_parser(
        "show",
        help="print a license (or revocation) and whether its signature verifies",
        description="Print a readable summary of a license or revocation file. With --vendor-key (or "
        "LM_VENDOR_KEY) also verify its signature; exit 1 if it does not verify.",
    )
    show.add_argument("file", metavar="FILE", help="a .lic license or .revoked revocation file (every "
                      "revocation in it is listed)")
    show.add_argument("--vendor-key", metavar="vendor.pub", help="the vendor public key (default: $LM_VENDOR_KEY)")
    show.set_defaults(func=_cmd_show)

    revoke = sub.add_parser(
        "revoke",
        help="add a signed revocation of a customer ID to a revocation list",
        description="Add a signed revocation to FILE (created if missing): a license server given this file "
        "stops serving CUSTOMER_ID. FILE may hold many revocations, each signed on its own; earlier ones are "
        "never dropped, and a customer ID already in FILE is not added twice.",
    )
    revoke.add_argument("customer_id", metavar="CUSTOMER_ID", help="the customer ID to revoke (CID-XXXX-...)")
    revoke.add_argument("--key", required=True, metavar="vendor.key", help="the vendor private key")
    revoke.add_argument("--out", required=True, metavar="FILE", help="the revocation list to add to (created "
                        "if missing)")
    revoke.add_argument("--reason", default="revoked by the vendor", help="one line kept in the file")
    revoke.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # accepted; never replaces
    revoke.set_defaults(func=_cmd_revoke)

    reissue = sub.add_parser(
        "reissue",
        help="replace a license (type or server change): new license plus revocation of the old",
        description="Verify OLD.lic (it must be signed with this --key), issue a new license with a new\n"
        "customer ID from REQUEST.yaml to NEW.lic, and write a signed revocation of the old customer ID\n"
        "beside it as NEW.revoked (NEW.lic -> NEW.revoked). Give both files to the license server.\n"
        "Use it when the license type or the license server changes.",
        epilog=_REQUEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reissue.add_argument("old", metavar="OLD.lic", help="the license being replaced")
    reissue.add_argument("request", metavar="REQUEST.yaml", help="the registration request for the new license")
    reissue.add_argument("--key", required=True, metavar="vendor.key", help="the vendor private key")
    reissue.add_argument("--out", required=True, metavar="NEW.lic", help="where to write the new license")
    reissue.add_argument("--reason", default=None, help="reason recorded in the revocation")
    reissue.add_argument("--force", action="store_true", help="replace NEW.lic and NEW.revoked if they exist")
    reissue.set_defaults(func=_cmd_reissue)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lmissue``; returns the exit code (0 ok, 1 problem, 2 usage)."""
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args, sys.stdout))
    except _Failure as exc:
        sys.stdout.flush()
        print(f"lmissue: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lmissue: interrupted", file=sys.stderr)
        return 130
