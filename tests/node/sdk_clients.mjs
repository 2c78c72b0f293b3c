// The official openai Node SDK against an OpenAI-compatible server (the proxy, or the mock upstream):
// the chat stream helper, a streamed completion and default (base64) embeddings. Prints one JSON object.
// Usage: node sdk_clients.mjs BASE_URL API_KEY CHAT_MODEL EMBED_MODEL
import OpenAI from "openai";

const [baseURL, apiKey, chatModel, embedModel] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30_000 });
const out = {};

async function attempt(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { error: `${e.constructor.name}: ${e.message}` };
  }
}

await attempt("chat_stream", async () => {
  const stream = client.chat.completions.stream({
    model: chatModel,
    messages: [{ role: "user", content: "tell me about tokens" }],
    stream_options: { include_usage: true },
  });
  const final = await stream.finalChatCompletion();
  const message = final.choices[0].message;
  return { role: message.role, content: message.content, finish_reason: final.choices[0].finish_reason, usage: final.usage };
});

await attempt("completions_stream", async () => {
  const stream = await client.completions.create({ model: chatModel, prompt: "say something", stream: true });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return {
    objects: [...new Set(chunks.map((c) => c.object))],
    text: chunks.map((c) => c.choices[0]?.text ?? "").join(""),
    finish_reason: chunks.map((c) => c.choices[0]?.finish_reason).filter(Boolean),
  };
});

await attempt("embeddings", async () => {
  // No encoding_format: the SDK asks for base64 and decodes it to float32 itself.
  const reply = await client.embeddings.create({ model: embedModel, input: ["first text", "second text"] });
  return reply.data.map((d) => Array.from(d.embedding));
});

console.log(JSON.stringify(out));
