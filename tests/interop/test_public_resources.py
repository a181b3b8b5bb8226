"""`resources.public_uris` against the reference server-everything (over streamable HTTP), whose one
`demo://` scheme mixes shared documents (`demo://resource/static/document/*.md`) with numbered
dynamic resources. With the dynamic text resources made tenant-scoped (tenants "1" and "2", so each
tenant's own resource exists upstream), the Python SDK client reads and lists the documents through
the proxy as it does directly, reads its own dynamic resource, and gets the other tenant's, which
the server would serve, answered exactly as an unknown resource.
"""

from __future__ import annotations

import pytest
from mcp import MCPError

from proxy.demo import client_for
from tests.conftest import StartProxy

pytestmark = pytest.mark.e2e

FEATURES = "demo://resource/static/document/features.md"
POLICY = {
    "resources": {
        "tenant_uri_templates": ["demo://resource/dynamic/text/{tenant}"],
        "public_uris": ["demo://resource/static/document/*"],
    }
}


async def test_shared_documents_pass_while_another_tenants_dynamic_resource_stays_unknown(
    make_proxy: StartProxy, everything_http: str
) -> None:
    async with client_for(everything_http, "unused", "legacy") as direct:
        documents = sorted(r.uri for r in (await direct.list_resources()).resources if "static" in r.uri)
        features = (await direct.read_resource(FEATURES)).contents[0].text
        other = await direct.read_resource("demo://resource/dynamic/text/2")  # it exists upstream
    assert len(documents) == 7 and FEATURES in documents
    assert "Resource 2" in other.contents[0].text
    running = await make_proxy(
        {"1": everything_http, "2": everything_http}, policies={"1": POLICY, "2": POLICY}
    )
    async with client_for(running.url, running.token("1")) as client:
        listed = sorted(r.uri for r in (await client.list_resources()).resources)
        read = (await client.read_resource(FEATURES)).contents[0].text
        own = await client.read_resource("demo://resource/dynamic/text/1")
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
        with pytest.raises(MCPError) as refused:
            await client.read_resource("demo://resource/dynamic/text/2")
        with pytest.raises(MCPError) as dotted:
            await client.read_resource("demo://resource/static/document/../../dynamic/text/2")
    assert listed == documents
    assert read == features
    assert "Resource 1" in own.contents[0].text
    assert "demo://resource/dynamic/text/{resourceId}" in templates
    assert refused.value.error.code == -32602
    assert refused.value.error.message == "Unknown resource: demo://resource/dynamic/text/2"
    assert dotted.value.error.code == -32602
