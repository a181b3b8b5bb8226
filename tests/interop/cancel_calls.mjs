// The TypeScript SDK client (1.32.2, handshake era) cancels calls of the stdio test server's `slow`
// tool once each has started (its log message arrived), then calls whoami. Prints one JSON line.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { LoggingMessageNotificationSchema } from '@modelcontextprotocol/sdk/types.js';

const url = new URL(process.env.MCP_URL);
const attempts = Number(process.env.ATTEMPTS);
const transport = new StreamableHTTPClientTransport(url, {
  requestInit: { headers: { Authorization: `Bearer ${process.env.MCP_TOKEN}` } },
});
const client = new Client({ name: 'cancelling-client', version: '1.0.0' }, { capabilities: {} });
await client.connect(transport);
const outcomes = [];
for (let attempt = 0; attempt < attempts; attempt++) {
  const tag = `ts-${attempt}`;
  let started;
  const running = new Promise((resolve) => { started = resolve; });
  client.setNotificationHandler(LoggingMessageNotificationSchema, (note) => {
    if (String(note.params.data).includes(`slow ${tag} started`)) started();
  });
  const controller = new AbortController();
  const call = client.callTool({ name: 'slow', arguments: { tag, seconds: 30 } }, undefined,
    { signal: controller.signal, timeout: 60000 });
  await running;
  controller.abort('the user gave up');
  try {
    await call;
    outcomes.push('answered');
  } catch (error) {
    outcomes.push(controller.signal.aborted ? 'aborted' : `failed: ${error}`);
  }
}
const who = await client.callTool({ name: 'whoami', arguments: {} });
console.log(JSON.stringify({ outcomes, who: who.structuredContent }));
await transport.terminateSession();
await client.close();
