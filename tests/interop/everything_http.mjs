// server-everything over streamable HTTP, bound to loopback (its own entry point listens on every
// interface): the package's server factory behind the TypeScript SDK's transport, one per session,
// resumable (an in-memory event store), as its streamableHttp entry point runs it.
// Usage: node everything_http.mjs  -> prints "listening <port>" once it accepts connections.
import { createServer as createHttpServer } from "node:http";
import { randomUUID } from "node:crypto";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { createServer } from "@modelcontextprotocol/server-everything/dist/server/index.js";

class InMemoryEventStore {
  events = new Map();
  async storeEvent(streamId, message) {
    const eventId = `${streamId}_${randomUUID()}`;
    this.events.set(eventId, { streamId, message });
    return eventId;
  }
  async replayEventsAfter(lastEventId, { send }) {
    const entries = Array.from(this.events.entries());
    const start = entries.findIndex(([id]) => id === lastEventId);
    if (start === -1) return "";
    const { streamId } = entries[start][1];
    for (const [eventId, event] of entries.slice(start + 1)) {
      if (event.streamId === streamId) await send(eventId, event.message);
    }
    return streamId;
  }
}

const transports = new Map();

async function body(request) {
  const chunks = [];
  for await (const chunk of request) chunks.push(chunk);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString("utf8")) : undefined;
}

function refuse(response, status, message) {
  response.writeHead(status, { "content-type": "application/json" });
  response.end(JSON.stringify({ jsonrpc: "2.0", error: { code: -32000, message }, id: null }));
}

const server = createHttpServer(async (request, response) => {
  try {
    const sessionId = request.headers["mcp-session-id"];
    const parsed = request.method === "POST" ? await body(request) : undefined;
    let transport = sessionId ? transports.get(sessionId) : undefined;
    if (!transport) {
      if (sessionId || request.method !== "POST") {
        return refuse(response, 400, "Bad Request: No valid session ID provided");
      }
      const { server: mcp, cleanup } = createServer();
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        eventStore: new InMemoryEventStore(),
        onsessioninitialized: (id) => transports.set(id, transport),
      });
      mcp.server.onclose = () => {
        if (transport.sessionId) transports.delete(transport.sessionId);
        cleanup(transport.sessionId);
      };
      await mcp.connect(transport);
    }
    await transport.handleRequest(request, response, parsed);
  } catch (error) {
    if (!response.headersSent) refuse(response, 500, "Internal server error");
  }
});

server.listen(0, "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
process.on("SIGTERM", () => process.exit(0));
