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

import functools
import gettext
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DOMAIN", "LANGUAGES", "LOCALE_DIR", "N_", "Text", "catalog", "gettext_", "language", "tr"]

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
