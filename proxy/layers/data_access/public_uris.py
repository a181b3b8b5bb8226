"""`resources.public_uris`: URIs shared by every tenant of an upstream, in a scheme whose other URIs
belong to tenants (`resources.tenant_uri_templates`).

A glob is simple on purpose: `*` matches within one path segment, `**` across segments, neither
matches `?` or `#`, everything else is literal, and the scheme and authority are never wildcards.
What makes a URI public is checked strictly, since a public URI reaches the upstream for anyone:

    the tenant URI rules first (engine.uri_tenant: whitespace, control characters, dot segments)
    no backslash and no percent-escape but a space or a non-ASCII byte: one spelling per URI
    nothing a template could give a tenant: a URI starting with a template's text before its
      first variable (compared decoded, NFKC-normalised and case-folded) may be a tenant's,
      whatever glob matches it
    then the globs
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

# A percent-escape a public URI may hold: a space, or a byte of a non-ASCII character. Any other
# (an encoded slash, dot, percent or letter) spells a URI the upstream may read as another one.
_PLAIN_ESCAPE = re.compile(r"%(?:20|[89A-Fa-f][0-9A-Fa-f])")


def plain_uri_text(text: str) -> bool:
    """No whitespace or control characters, no backslash, no percent-escape but `_PLAIN_ESCAPE`'s:
    the text spells the URI the upstream reads, with no other way to read it."""
    if any(ch.isspace() or not ch.isprintable() or ch == "\\" for ch in text):
        return False
    return "%" not in _PLAIN_ESCAPE.sub("", text)


def folded(text: str) -> str:
    """A URI as loosely as any upstream might read it (decoded, compatibility-normalised, case-folded):
    what is compared against the templates' territories."""
    return unicodedata.normalize("NFKC", unquote(text)).casefold()


def territory(template: str) -> str:
    """The part of a tenant URI template before its first variable, folded: every URI starting with
    it may be some tenant's. (Templates are checked when loaded: their first brace opens a variable.)"""
    return folded(template.partition("{")[0])


@dataclass(frozen=True, slots=True)
class PublicUris:
    """`resources.public_uris`, compiled: URIs shared by every tenant though in a tenant-scoped scheme."""

    pattern: re.Pattern[str]
    territories: tuple[str, ...]  # templates' text before their first variable, folded

    def shares(self, uri: str) -> bool:
        """Whether `uri` is public. The caller has refused dot segments already (engine.uri_tenant)."""
        if not plain_uri_text(uri) or self.pattern.fullmatch(uri) is None:
            return False
        loose = folded(uri)
        return not any(loose.startswith(claimed) for claimed in self.territories)


NO_PUBLIC_URIS: Final = PublicUris(re.compile(r"(?!)"), ())


def compile_public_uri(glob: str, templates: tuple[str, ...]) -> str:
    """One public URI glob as a regular expression; ValueError naming what is wrong with it."""
    scheme, sep, rest = glob.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"{glob!r} must start with a URI scheme (e.g. docs://shared/**)")
    if "{" in glob or "}" in glob:
        raise ValueError(f"{glob!r}: a public URI is a glob, not a template: no {{variables}}")
    if not plain_uri_text(glob):
        raise ValueError(
            f"{glob!r} holds whitespace, a backslash or a percent-escape a public URI may not have"
        )
    if "***" in glob or any(part in (".", "..") for part in rest.split("/")):
        raise ValueError(f"{glob!r}: only * and ** are wildcards, and dot segments never match")
    # The scheme and authority are literal: a wildcard may only follow the path's first slash.
    path_start = rest.find("/", 2) if rest.startswith("//") else rest.find("/")
    if "*" in rest and not 0 <= path_start < rest.index("*"):
        raise ValueError(f"{glob!r}: wildcards may only stand in the path (after scheme://authority/)")
    schemes = {t.partition(":")[0].lower() for t in templates}
    if scheme.lower() not in schemes:
        raise ValueError(
            f"{glob!r}: {scheme} is no scheme of resources.tenant_uri_templates, so its URIs are "
            "every tenant's already"
        )
    literal = folded(glob.partition("*")[0])
    for claimed in (territory(t) for t in templates):
        if literal.startswith(claimed):
            raise ValueError(
                f"{glob!r} lies inside {claimed}..., which the tenant templates give to tenants: "
                "it could never match"
            )
    parts = [f"(?i:{re.escape(scheme)}):"]
    for piece in re.split(r"(\*\*|\*)", rest):
        parts.append({"**": "[^?#]*", "*": "[^/?#]*"}.get(piece, re.escape(piece)))
    return "".join(parts)


def compile_public_uris(globs: tuple[str, ...], templates: tuple[str, ...]) -> PublicUris:
    if not globs:
        return NO_PUBLIC_URIS
    pattern = re.compile("|".join(f"(?:{compile_public_uri(g, templates)})" for g in globs))
    return PublicUris(pattern, tuple(territory(t) for t in templates))
