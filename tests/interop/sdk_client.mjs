// The TypeScript SDK client (1.x, handshake era) driven by the interop tests: connects to MCP_URL
// (with MCP_TOKEN as a bearer token when set), runs the steps given as JSON in argv[2] and prints
// one JSON document: what each step returned, or the error it raised (its class, code, message).
// Steps: {"do": "listTools" | "callTool" | "listResources" | "readResource" | "listPrompts" |
//         "getPrompt", "name", "arguments", "uri", "progress": true}
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const steps = JSON.parse(process.argv[2] ?? "[]");
const headers = process.env.MCP_TOKEN ? { Authorization: `Bearer ${process.env.MCP_TOKEN}` } : {};
const transport = new StreamableHTTPClientTransport(new URL(process.env.MCP_URL), {
  requestInit: { headers },
});
const client = new Client({ name: "interop-client", version: "0.1.0" }, { capabilities: {} });
const out = { steps: [], transportErrors: [] };
client.onerror = (error) => out.transportErrors.push(String(error?.message ?? error));

async function run(step) {
  switch (step.do) {
    case "listTools":
      return (await client.listTools()).tools.map((tool) => tool.name).sort();
    case "callTool": {
      const progress = [];
      const options = step.progress
        ? { onprogress: (p) => progress.push([p.progress, p.total]), timeout: 30_000 }
        : { timeout: 30_000 };
      const result = await client.callTool({ name: step.name, arguments: step.arguments ?? {} }, undefined, options);
      return step.progress ? { result, progress } : result;
    }
    case "listResources":
      return (await client.listResources()).resources.map((resource) => resource.uri).sort();
    case "readResource":
      return await client.readResource({ uri: step.uri });
    case "listPrompts":
      return (await client.listPrompts()).prompts.map((prompt) => prompt.name).sort();
    case "getPrompt":
      return await client.getPrompt({ name: step.name, arguments: step.arguments ?? {} });
    default:
      throw new Error(`unknown step ${step.do}`);
  }
}

try {
  await client.connect(transport);
  out.protocolVersion = transport.protocolVersion;
  out.serverName = client.getServerVersion()?.name;
  for (const step of steps) {
    try {
      out.steps.push({ ok: await run(step) });
    } catch (error) {
      out.steps.push({ error: { name: error?.constructor?.name, code: error?.code, message: error?.message } });
    }
  }
  await transport.terminateSession();
} catch (error) {
  out.connectError = { name: error?.constructor?.name, code: error?.code, message: error?.message };
}
await client.close();
console.log(JSON.stringify(out));
