"""`verify` and `policy suggest|test|explain`: an operator's own checks of a deployment and its policies.

command.py       the commands (argparse), exit codes
run.py           verify: tokens, reaching the deployment as each tenant, static checks, probes
client.py        a small MCP client, both eras, over the proxy's Upstream transports
inventory.py     what a tenant is offered, and the policy behind it (TenantView)
static.py        checks of declared schemas and templates against the policy
probe.py         canaries written as one tenant, looked for as another
replay.py        session ids, request state and task ids replayed across tenants
report.py        findings, severities, text and JSON output
suggest.py       policy suggest: a commented policy from a tenant's upstream
policy_tests.py  policy test and explain: the engine's decisions, without an upstream
arguments.py, words.py, snippets.py: schema walking and sample values, name heuristics, fixes
"""
