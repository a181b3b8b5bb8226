"""What `verify` found: findings by severity, each with its evidence and the policy that fixes it.

A finding's id (`check:tenant:target`) stays the same from run to run, so an operator who has
reviewed one and judged it harmless passes it to `--accept` and the run exits 0 again. The JSON
form (`--json`) is one document with the same fields as the text.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Final

EXIT_CLEAN: Final = 0
EXIT_FINDINGS: Final = 1
EXIT_COULD_NOT_RUN: Final = 2


class Severity(enum.IntEnum):
    LOW = 1  # worth a look: a shape that often hides a problem
    MEDIUM = 2  # likely a gap, or one that needs a second condition to leak
    HIGH = 3  # one tenant can reach another's data, or nothing stands in the way of it

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Finding:
    check: str  # which check found it (open-tenant-argument, probe-cross-tenant-read, ...)
    severity: Severity
    tenant: str
    target: str  # what it is about, as part of the id: a tool and argument, a template, a session
    title: str  # one sentence
    evidence: tuple[str, ...]
    fix: str  # a policy (or config) snippet that fixes it, YAML
    fix_file: str | None = None  # where the snippet goes

    @property
    def id(self) -> str:
        return f"{self.check}:{self.tenant}:{self.target}"

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "check": self.check,
            "severity": self.severity.label,
            "tenant": self.tenant,
            "target": self.target,
            "title": self.title,
            "evidence": list(self.evidence),
            "fix": self.fix,
            "fix_file": self.fix_file,
        }


@dataclass
class Report:
    url: str
    tenants: tuple[str, ...]
    probed: bool
    findings: list[Finding] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # what was looked at, one line each
    notes: list[str] = field(default_factory=list)  # probes skipped and why, canaries written
    accepted: frozenset[str] = frozenset()

    def add(self, finding: Finding) -> None:
        if all(known.id != finding.id for known in self.findings):
            self.findings.append(finding)

    @property
    def open_findings(self) -> list[Finding]:
        """Findings not accepted, most severe first."""
        kept = [f for f in self.findings if f.id not in self.accepted]
        return sorted(kept, key=lambda f: (-f.severity, f.tenant, f.check, f.target))

    @property
    def exit_code(self) -> int:
        return EXIT_FINDINGS if self.open_findings else EXIT_CLEAN

    def counts(self) -> dict[str, int]:
        found = self.open_findings
        return {s.label: sum(1 for f in found if f.severity is s) for s in sorted(Severity, reverse=True)}

    def as_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "tenants": list(self.tenants),
            "probed": self.probed,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "findings": [f.as_json() for f in self.open_findings],
            "accepted": sorted(f.id for f in self.findings if f.id in self.accepted),
            "checked": self.checked,
            "notes": self.notes,
        }

    def json_text(self) -> str:
        return json.dumps(self.as_json(), indent=2, ensure_ascii=False)

    def text(self) -> str:
        mode = "static checks and probes" if self.probed else "static checks (probes: --probe)"
        lines = [f"verify {self.url} as {', '.join(self.tenants)}: {mode}"]
        lines.extend(f"  checked {line}" for line in self.checked)
        lines.extend(f"  note: {line}" for line in self.notes)
        for finding in self.open_findings:
            lines.append("")
            lines.append(f"{finding.severity.label.upper():<6} {finding.id}")
            lines.append(f"       {finding.title}")
            lines.extend(f"       evidence: {line}" for line in finding.evidence)
            where = f" ({finding.fix_file})" if finding.fix_file else ""
            lines.append(f"       fix{where}:")
            lines.extend(f"         {line}" for line in finding.fix.rstrip("\n").splitlines())
        accepted = sum(1 for f in self.findings if f.id in self.accepted)
        counts = ", ".join(f"{n} {label}" for label, n in self.counts().items())
        summary = f"{len(self.open_findings)} findings ({counts})"
        if accepted:
            summary += f", {accepted} accepted"
        lines.extend(["", f"{summary}: exit {self.exit_code}"])
        return "\n".join(lines) + "\n"
