"""What names and descriptions suggest: the heuristics of `verify` and `policy suggest`, in one place.

A name is split into words (`orgId`, `org_id`, `org-id` -> org, id) and looked up in small word
lists; a run-together name (`tenantid`) is matched whole. These are guesses an operator reviews:
each finding says which word made it, and `--accept` records a reviewed false positive.
"""

from __future__ import annotations

import re
from typing import Final

# Words that, in an argument or URI variable name, say whose data a request is about.
TENANT_WORDS: Final = frozenset(
    {
        "tenant", "tenants", "org", "orgs", "organization", "organizations", "organisation",
        "organisations", "account", "accounts", "workspace", "workspaces", "customer", "customers",
        "company", "companies", "team", "teams", "owner", "owners", "realm", "realms",
    }
)  # fmt: skip
_RUN_TOGETHER = re.compile(
    r"^(tenant|org|organi[sz]ation|account|workspace|customer|company|team|owner|realm)"
    r"(id|ids|name|slug|key|uuid|code)$"
)
_TENANT_DESCRIPTION = re.compile(
    r"\b(tenants?|organi[sz]ations?|workspaces?|customers?|compan(?:y|ies)|realms?|"
    r"whose (?:data|notes|records|files|account))\b",
    re.IGNORECASE,
)
# Words in a tool's name that suggest it reads records shared by every caller of the upstream.
HISTORY_WORDS: Final = frozenset(
    {"recent", "history", "histories", "log", "logs", "activity", "activities", "audit", "audits",
     "feed", "timeline", "journal", "events", "latest", "everything", "global"}
)  # fmt: skip
_HISTORY_DESCRIPTION = re.compile(
    r"\b(recent|history|activity|audit log|across (?:all )?(?:users|tenants|organi[sz]ations|accounts)|"
    r"all (?:users|tenants|organi[sz]ations|customers|accounts)|everyone)\b",
    re.IGNORECASE,
)
# Words that suggest a result depends on the caller (a user, a session, the moment), not only on
# the arguments and the tenant: a result the tenant-wide tools/call cache would hand to the next caller.
CALLER_WORDS: Final = frozenset(
    {"me", "my", "mine", "whoami", "current", "session", "inbox", "now", "today", "time", "random",
     "ask", "elicit", "sample", "interactive", "recent", "latest", "history", "activity"}
)  # fmt: skip
_CALLER_DESCRIPTION = re.compile(
    r"\b(your|the caller|current user|signed-in|logged-in|this session|right now|the user)\b", re.IGNORECASE
)
# Words in a tool's name that say calling it may destroy or send something: never probed.
DESTRUCTIVE_WORDS: Final = frozenset(
    {"delete", "remove", "drop", "destroy", "purge", "wipe", "erase", "reset", "revoke", "kill",
     "shutdown", "terminate", "send", "email", "mail", "pay", "payment", "transfer", "charge",
     "refund", "deploy", "publish", "execute", "exec", "run", "shell", "command", "truncate"}
)  # fmt: skip
_JSON_DESCRIPTION = re.compile(r"\bjson\b", re.IGNORECASE)
_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")


def words_of(name: str) -> list[str]:
    """`orgId` -> [org, id]; `search_all-notes` -> [search, all, notes]."""
    return [word.lower() for part in re.split(r"[^A-Za-z0-9]+", name) for word in _CAMEL.findall(part)]


def tenant_word(name: str) -> str | None:
    """The word that makes an argument name look tenant- or owner-identifying, or None."""
    for word in words_of(name):
        if word in TENANT_WORDS:
            return word
    joined = "".join(words_of(name))
    match = _RUN_TOGETHER.match(joined)
    return match.group(1) if match else None


def tenant_description(text: str | None) -> str | None:
    """The phrase of a description that says it names a tenant or owner, or None."""
    match = _TENANT_DESCRIPTION.search(text or "")
    return match.group(0) if match else None


def history_hint(name: str, description: str | None) -> str | None:
    """Why a tool looks like it reads shared history (a word of its name, or a phrase), or None."""
    words = words_of(name)
    for word in words:
        if word in HISTORY_WORDS:
            return f"its name has {word!r}"
    if ("all" in words and words.index("all") < len(words) - 1) or words[:2] == ["search", "all"]:
        return "its name has 'all'"
    match = _HISTORY_DESCRIPTION.search(description or "")
    return f"its description says {match.group(0)!r}" if match else None


def caller_hint(name: str, description: str | None) -> str | None:
    """Why a tool's result looks specific to its caller, or None."""
    for word in words_of(name):
        if word in CALLER_WORDS:
            return f"its name has {word!r}"
    match = _CALLER_DESCRIPTION.search(description or "")
    return f"its description says {match.group(0)!r}" if match else None


def destructive(name: str, annotations: object) -> bool:
    """Whether calling a tool might destroy or send something (its annotations or its name say so)."""
    if isinstance(annotations, dict) and annotations.get("destructiveHint") is True:
        return annotations.get("readOnlyHint") is not True
    return any(word in DESTRUCTIVE_WORDS for word in words_of(name))


def mentions_json(text: str | None) -> bool:
    return _JSON_DESCRIPTION.search(text or "") is not None
