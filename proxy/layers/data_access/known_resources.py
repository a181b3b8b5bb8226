"""What the proxy knows of a tenant's resources: the URIs its resources/list results offered and
the templates its resources/templates/list results offered, as relayed to the tenant's clients
(after the tenant's URI rules filtered them). Used to decide whether a URI some client named is
one of the tenant's catalog (proxy_recent_activity shows only such URIs), never to decide access.
"""

from __future__ import annotations

import re
from typing import Any, Final

MAX_URIS: Final = 10_000  # bounded whatever an upstream lists; beyond it, URIs are not learned
MAX_TEMPLATES: Final = 1_000
MAX_URI_CHARS: Final = 200  # longer: never learned nor shown (the audit cuts names at 256)
_EXPRESSION = re.compile(r"\{([+#./;?&]?)[A-Za-z0-9_.%,*:]+\}")  # RFC 6570 (a variable list, modifiers)
# What one variable's value may hold when a URI is matched against a template: printable URI
# characters only (no whitespace, no control characters), and no delimiter of the operator.
_VALUE: Final = "\\-A-Za-z0-9._~%!$'()*+,:@"
_OPERATOR_PATTERNS: Final = {
    "": f"[{_VALUE}=;]+",
    "+": f"[{_VALUE}=;/]+",
    "#": f"(?:#[{_VALUE}=;/?]*)?",
    ".": f"(?:\\.[{_VALUE}=;]*)*",
    "/": f"(?:/[{_VALUE}=;]*)*",
    ";": f"(?:;[{_VALUE}=]*)*",
    "?": f"(?:\\?[{_VALUE}=&;/]*)?",
    "&": f"(?:&[{_VALUE}=&;/]*)*",
}


def template_pattern(template: str) -> re.Pattern[str] | None:
    """A regular expression for the URIs an RFC 6570 template expands to (None: not one we read)."""
    if len(template) > MAX_URI_CHARS:
        return None
    parts, end = [], 0
    for expression in _EXPRESSION.finditer(template):
        parts.append(re.escape(template[end : expression.start()]))
        parts.append(_OPERATOR_PATTERNS[expression.group(1)])
        end = expression.end()
    rest = template[end:]
    if "{" in rest or "}" in rest:
        return None  # an expression we cannot read: it matches nothing
    parts.append(re.escape(rest))
    return re.compile("".join(parts))


class KnownResources:
    def __init__(self) -> None:
        self._uris: set[str] = set()
        self._templates: dict[str, re.Pattern[str]] = {}

    def learn(self, method: str, result: Any) -> None:
        """Record the URIs (resources/list) or templates (resources/templates/list) of a result page."""
        if not isinstance(result, dict):
            return
        if method == "resources/list" and isinstance(result.get("resources"), list):
            for item in result["resources"]:
                uri = item.get("uri") if isinstance(item, dict) else None
                if isinstance(uri, str) and len(uri) <= MAX_URI_CHARS and len(self._uris) < MAX_URIS:
                    self._uris.add(uri)
        elif method == "resources/templates/list" and isinstance(result.get("resourceTemplates"), list):
            for item in result["resourceTemplates"]:
                template = item.get("uriTemplate") if isinstance(item, dict) else None
                if isinstance(template, str) and template not in self._templates:
                    pattern = template_pattern(template)
                    if pattern is not None and len(self._templates) < MAX_TEMPLATES:
                        self._templates[template] = pattern

    def forget(self) -> None:
        """The upstream's resources changed (list_changed): learned again from the next lists."""
        self._uris.clear()
        self._templates.clear()

    def knows(self, uri: str) -> bool:
        if len(uri) > MAX_URI_CHARS or not (uri.isascii() and uri.isprintable()) or " " in uri:
            return False
        return uri in self._uris or any(p.fullmatch(uri) for p in self._templates.values())
