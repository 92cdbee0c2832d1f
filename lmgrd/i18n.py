"""Which language ``lmutil`` speaks to people, and the gettext catalog behind it.

Imports only the standard library; never ``client_stub`` (which has its own catalog, :mod:`client_stub.i18n`,
for the same reason). The English text is the msgid in the source; the Japanese is in ``lmgrd/locale/ja/LC_MESSAGES/
lmgrd.po``, compiled to the ``.mo`` beside it (``make i18n``; both are committed and shipped as package
data). Only text a person reads goes through here: machine-read output (``--json``, lmstat's FlexNet layout,
logs, metrics) and the wire stay English; the daemon itself never translates.

Why a second catalog rather than one shared domain: ``lmgrd`` and ``client_stub`` may not import each other,
and each ships on its own (a product embeds ``client_stub`` alone), so each package carries the catalog of its
own strings. The language rule below is the same as :func:`client_stub.i18n.language`; a test checks both.

The language is read at every call, not at import, so a change of the environment (a test) takes effect at
once:

1. ``LMGRD_LANG`` (``ja``, ``en``, ``ja_JP.UTF-8``, ...) wins;
2. else the POSIX order ``LC_ALL``, then ``LC_MESSAGES``, then ``LANG`` (the first that is set and non-empty);
3. anything that is not Japanese is English.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gettext
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ARGPARSE_MESSAGES", "DOMAIN", "LANGUAGES", "LOCALE_DIR", "N_", "Text", "argparse_in_language", "catalog",
           "gettext_", "language", "tr"]

DOMAIN = "lmgrd"
LOCALE_DIR = Path(__file__).resolve().parent / "locale"
#: The languages with a catalog; English is the source text itself.
LANGUAGES = ("en", "ja")
ENV_LANG = "LMGRD_LANG"
_LOCALE_VARS = ("LC_ALL", "LC_MESSAGES", "LANG")


def language(environ: Mapping[str, str] | None = None) -> str:
    """The language to speak: ``"ja"`` or ``"en"``.

    Args:
        environ: the environment to read (default: ``os.environ``).

    Returns:
        ``"ja"`` if ``LMGRD_LANG`` (or, without it, the locale) names Japanese, else ``"en"``.
    """
    env = os.environ if environ is None else environ
    chosen = env.get(ENV_LANG, "").strip()
    if not chosen:
        chosen = next((env[v].strip() for v in _LOCALE_VARS if env.get(v, "").strip()), "")
    return "ja" if chosen.lower().startswith("ja") else "en"


@functools.cache
def catalog(lang: str) -> gettext.NullTranslations:
    """The compiled catalog for ``lang`` (a ``NullTranslations`` that returns the English for ``"en"``).

    Raises:
        FileNotFoundError: a language in :data:`LANGUAGES` other than English has no compiled ``.mo`` (a broken
            install: run ``make i18n``).
    """
    if lang == "en":
        return gettext.NullTranslations()
    return gettext.translation(DOMAIN, LOCALE_DIR, languages=[lang])


def gettext_(message: str) -> str:
    """``message`` (an English msgid) in the current :func:`language`."""
    return catalog(language()).gettext(message)


def N_(message: str) -> str:
    """Mark ``message`` for extraction without translating it now (it is translated where it is shown)."""
    return message


#: argparse's own words (``usage:``, the section titles, its error messages), marked here so that extraction puts
#: them in this catalog: :func:`argparse_in_language` has argparse read them from it. The msgids are argparse's
#: (Python 3.11), character for character.
ARGPARSE_MESSAGES = (
    N_("usage: "),
    N_("positional arguments"),
    N_("options"),
    N_("show this help message and exit"),
    N_("show program's version number and exit"),
    N_("%(prog)s: error: %(message)s\n"),
    N_("argument %(argument_name)s: %(message)s"),
    N_("the following arguments are required: %s"),
    N_("unrecognized arguments: %s"),
    N_("invalid choice: %(value)r (choose from %(choices)s)"),
    N_("invalid %(type)s value: %(value)r"),
    N_("expected one argument"),
    N_("expected at most one argument"),
    N_("expected at least one argument"),
    N_("not allowed with argument %s"),
    N_("one of the arguments %s is required"),
    N_("ambiguous option: %(option)s could match %(matches)s"),
    N_("ignored explicit argument %r"),
    N_("unknown parser %(parser_name)r (choices: %(choices)s)"),
    N_("can't open '%(filename)s': %(error)s"),
)


@contextlib.contextmanager
def argparse_in_language() -> Iterator[None]:
    """While inside, argparse's own words come from this catalog in the current :func:`language`.

    argparse translates through the module-level ``_`` and ``ngettext`` it imported from :mod:`gettext` (which
    would read the process-wide default domain and only the POSIX locale, never ``LMGRD_LANG``); they are pointed
    at this package's catalog for the duration and put back after, so nothing outside the CLI's parse sees it.
    """
    cat = catalog(language())
    names = vars(argparse)  # the module's globals, where its functions look the two names up at each call
    saved = names["_"], names["ngettext"]
    names["_"], names["ngettext"] = cat.gettext, cat.ngettext
    try:
        yield
    finally:
        names["_"], names["ngettext"] = saved


@dataclass(frozen=True, slots=True)
class Text:
    """A message kept as its msgid and parameters, so it can be shown in English (``--json``, logs) and in the
    user's language (a person's terminal) from one place."""

    msgid: str
    params: Mapping[str, object] = field(default_factory=dict)

    def english(self) -> str:
        """The message in English: the msgid with its parameters."""
        return self.msgid.format(**self.params)

    def localized(self) -> str:
        """The message in the current :func:`language`."""
        return gettext_(self.msgid).format(**self.params)

    def __str__(self) -> str:
        return self.english()


def tr(msgid: str, **params: object) -> Text:
    """A :class:`Text` (the extraction keyword for messages shown in both languages)."""
    return Text(msgid, params)
