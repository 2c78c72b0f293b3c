// The Vercel AI SDK against the proxy: the default `openai(model)` (the Responses API) with generateText,
// streamText and a tool-call turn, and `anthropic(model)` (the Messages API) with generateText and streamText.
// Prints one JSON object; an entry that failed holds {error}. Used by tests/test_ai_sdk.py.
// Usage: node ai_sdk_clients.mjs BASE_URL API_KEY OPENAI_MODEL [ANTHROPIC_MODEL]
import { createAnthropic } from "@ai-sdk/anthropic";
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

globalThis.AI_SDK_LOG_WARNINGS = false; // stdout carries only the JSON
const [baseURL, apiKey, openaiModel, anthropicModel] = process.argv.slice(2);
const openai = createOpenAI({ baseURL: `${baseURL}/v1`, apiKey });
const anthropic = createAnthropic({ baseURL: `${baseURL}/v1`, apiKey });
const out = {};

async function attempt(name, fn) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { error: `${e.constructor.name}: ${e.message}` };
  }
}

const usage = (u) => ({ inputTokens: u.inputTokens, outputTokens: u.outputTokens });

async function generate(model) {
  const r = await generateText({ model, prompt: "What is a proxy?", maxRetries: 0 });
  return { text: r.text, finishReason: r.finishReason, usage: usage(r.usage), modelId: r.response.modelId };
}

async function stream(model) {
  const r = streamText({ model, prompt: "Stream please.", maxRetries: 0, onError: () => {} });
  const deltas = [];
  for await (const part of r.textStream) deltas.push(part);
  return { deltas: deltas.length, text: await r.text, finishReason: await r.finishReason, usage: usage(await r.usage) };
}

await attempt("openai_generate", () => generate(openai(openaiModel)));
await attempt("openai_stream", () => stream(openai(openaiModel)));
await attempt("openai_tool_turn", async () => {
  const getWeather = tool({
    description: "Weather in a city",
    inputSchema: jsonSchema({
      type: "object",
      properties: { city: { type: "string" } },
      required: ["city"],
      additionalProperties: false,
    }),
    execute: async ({ city }) => `18C in ${city}`,
  });
  const r = await generateText({
    model: openai(openaiModel),
    prompt: "Weather in Paris?",
    tools: { get_weather: getWeather },
    stopWhen: stepCountIs(2),
    maxRetries: 0,
  });
  return {
    steps: r.steps.map((s) => ({
      finishReason: s.finishReason,
      toolCalls: s.toolCalls.map((c) => ({ name: c.toolName, input: c.input })),
      toolResults: s.toolResults.map((t) => t.output),
    })),
    text: r.text,
  };
});
if (anthropicModel) {
  await attempt("anthropic_generate", () => generate(anthropic(anthropicModel)));
  await attempt("anthropic_stream", () => stream(anthropic(anthropicModel)));
}
process.stdout.write(JSON.stringify(out));
