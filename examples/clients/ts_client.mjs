// Call an MCP server through mcp-tenant-proxy with the official TypeScript SDK
// (npm install @modelcontextprotocol/sdk):
//
//   export MCP_TOKEN=$(mcp-tenant-proxy mint-token --config CONFIG --issuer dev --tenant acme --sub alice)
//   node ts_client.mjs http://127.0.0.1:8080/mcp                        # list the tools
//   node ts_client.mjs http://127.0.0.1:8080/mcp echo '{"message": "hi"}'
//
// The proxy is an MCP server to the client: only the bearer token is added, on every request.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, tool, args] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${process.env.MCP_TOKEN}` } },
});
const client = new Client({ name: "ts-client-example", version: "1.0.0" });
await client.connect(transport);
try {
  if (tool === undefined) {
    const { tools } = await client.listTools();
    console.log(tools.map((t) => t.name).join("\n"));
  } else {
    const result = await client.callTool({ name: tool, arguments: args ? JSON.parse(args) : {} });
    console.log(
      result.structuredContent !== undefined
        ? JSON.stringify(result.structuredContent)
        : result.content.map((block) => block.text ?? "").join("\n"),
    );
    if (result.isError) process.exitCode = 1;
  }
} finally {
  await transport.terminateSession(); // ends the session at the proxy (close() alone does not)
  await client.close();
}
