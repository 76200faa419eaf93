// The official Node SDKs against a byok sidecar, as an application in the pod uses them.
//
// Run by e2e/tests/sdk.rs with exactly the environment the webhook gave the pod's app
// container (base URLs, placeholder keys, plus the container's own variables): nothing here
// names a host, a port, a key or a header. Each argument is a scenario; each prints one JSON
// line: {scenario, text, input_tokens, output_tokens, deltas} when the SDK parsed an answer,
// {scenario, error: {type, status, message}} when it threw a status error (`type` is the
// exported name of the error class, e.g. Anthropic.PermissionDeniedError).

import Anthropic from '@anthropic-ai/sdk';
import OpenAI, { AzureOpenAI } from 'openai';
import { ApiError, GoogleGenAI } from '@google/genai';
import { OAuth2Client } from 'google-auth-library';

const PROMPT = 'Say hello.';
const ANTHROPIC_MODEL = 'claude-sonnet-4-5';
const OPENAI_MODEL = 'gpt-4o-mini';
const GEMINI_MODEL = 'gemini-2.5-flash';
// Outside the keys' allowedModels: the sidecar answers 403 itself.
const DENIED = { anthropic: 'claude-opus-4-1', openai: 'gpt-4o', gemini: 'gemini-2.5-pro' };
const AZURE_DEPLOYMENT = 'gpt-4o';

const result = (text, inputTokens, outputTokens, deltas = null) => ({
  text,
  input_tokens: inputTokens,
  output_tokens: outputTokens,
  deltas,
});

// Retries are the SDKs' default; a refusal scenario turns them off so that the test sees the
// first answer at once (the sidecar's 503 says retry-after: 5).
const anthropic = (retries = true) => (retries ? new Anthropic() : new Anthropic({ maxRetries: 0 }));
const openai = (retries = true) => (retries ? new OpenAI() : new OpenAI({ maxRetries: 0 }));
// docs/injection.md: the Azure client prefers OPENAI_BASE_URL (set for the pod's openai key)
// over AZURE_OPENAI_ENDPOINT; name the endpoint variable and drop the base URL.
const azure = () => new AzureOpenAI({ endpoint: process.env.AZURE_OPENAI_ENDPOINT, baseURL: null });
// An OpenAI-compatible key: its own BYOK_<NAME>_BASE_URL (OPENAI_BASE_URL is the openai key's).
const compat = () => new OpenAI({ baseURL: process.env.BYOK_COMPAT_BASE_URL });
// GEMINI_API_KEY and GOOGLE_GEMINI_BASE_URL from the environment.
const gemini = () => new GoogleGenAI({});
// docs/injection.md: project and location from the app's own settings, a placeholder token
// that the sidecar replaces with the real access token.
function vertex() {
  const authClient = new OAuth2Client();
  authClient.setCredentials({ access_token: 'byok-proxy', expiry_date: Date.now() + 3600e3 });
  return new GoogleGenAI({
    vertexai: true,
    project: process.env.GOOGLE_CLOUD_PROJECT,
    location: process.env.GOOGLE_CLOUD_LOCATION,
    googleAuthOptions: { authClient },
  });
}

async function anthropicMessages(client, model = ANTHROPIC_MODEL) {
  const m = await client.messages.create({
    model,
    max_tokens: 64,
    messages: [{ role: 'user', content: PROMPT }],
  });
  return result(m.content[0].text, m.usage.input_tokens, m.usage.output_tokens);
}

async function anthropicStream(client, model = ANTHROPIC_MODEL) {
  const stream = client.messages.stream({
    model,
    max_tokens: 64,
    messages: [{ role: 'user', content: PROMPT }],
  });
  let deltas = 0;
  for await (const event of stream) {
    if (event.type === 'content_block_delta') deltas += 1;
  }
  const m = await stream.finalMessage();
  return result(m.content[0].text, m.usage.input_tokens, m.usage.output_tokens, deltas);
}

async function openaiChat(client, model, stream = false) {
  const messages = [{ role: 'user', content: PROMPT }];
  if (!stream) {
    const c = await client.chat.completions.create({ model, messages });
    return result(c.choices[0].message.content, c.usage.prompt_tokens, c.usage.completion_tokens);
  }
  const chunks = await client.chat.completions.create({
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = '';
  let deltas = 0;
  let usage = null;
  for await (const chunk of chunks) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      if (choice.delta.content) {
        text += choice.delta.content;
        deltas += 1;
      }
    }
  }
  return result(text, usage?.prompt_tokens ?? null, usage?.completion_tokens ?? null, deltas);
}

async function openaiResponses(client, stream = false) {
  if (!stream) {
    const r = await client.responses.create({ model: OPENAI_MODEL, input: PROMPT });
    return result(r.output_text, r.usage.input_tokens, r.usage.output_tokens);
  }
  // The SDK's stream helper: its final response has `output_text` (the raw events' do not).
  const events = client.responses.stream({ model: OPENAI_MODEL, input: PROMPT });
  let deltas = 0;
  for await (const event of events) {
    if (event.type === 'response.output_text.delta') deltas += 1;
  }
  const final = await events.finalResponse();
  return result(final.output_text, final.usage.input_tokens, final.usage.output_tokens, deltas);
}

async function genaiGenerate(client, model = GEMINI_MODEL, stream = false) {
  if (!stream) {
    const r = await client.models.generateContent({ model, contents: PROMPT });
    const u = r.usageMetadata;
    return result(r.text, u.promptTokenCount, u.candidatesTokenCount);
  }
  const chunks = await client.models.generateContentStream({ model, contents: PROMPT });
  let text = '';
  let deltas = 0;
  let usage = null;
  for await (const chunk of chunks) {
    deltas += 1;
    text += chunk.text ?? '';
    usage = chunk.usageMetadata ?? usage;
  }
  return result(text, usage.promptTokenCount, usage.candidatesTokenCount, deltas);
}

const SCENARIOS = {
  'anthropic.messages': () => anthropicMessages(anthropic()),
  'anthropic.stream': () => anthropicStream(anthropic()),
  'anthropic.denied': () => anthropicMessages(anthropic(false), DENIED.anthropic),
  'anthropic.denied.stream': () => anthropicStream(anthropic(false), DENIED.anthropic),
  'anthropic.unavailable': () => anthropicMessages(anthropic(false)),
  'openai.chat': () => openaiChat(openai(), OPENAI_MODEL),
  'openai.chat.stream': () => openaiChat(openai(), OPENAI_MODEL, true),
  'openai.responses': () => openaiResponses(openai()),
  'openai.responses.stream': () => openaiResponses(openai(), true),
  'openai.denied': () => openaiChat(openai(false), DENIED.openai),
  'openai.denied.stream': () => openaiChat(openai(false), DENIED.openai, true),
  'openai.unavailable': () => openaiChat(openai(false), OPENAI_MODEL),
  'azure.chat': () => openaiChat(azure(), AZURE_DEPLOYMENT),
  'azure.chat.stream': () => openaiChat(azure(), AZURE_DEPLOYMENT, true),
  'compat.chat': () => openaiChat(compat(), OPENAI_MODEL),
  'compat.chat.stream': () => openaiChat(compat(), OPENAI_MODEL, true),
  'gemini.generate': () => genaiGenerate(gemini()),
  'gemini.stream': () => genaiGenerate(gemini(), GEMINI_MODEL, true),
  'gemini.denied': () => genaiGenerate(gemini(), DENIED.gemini),
  'gemini.denied.stream': () => genaiGenerate(gemini(), DENIED.gemini, true),
  'gemini.unavailable': () => genaiGenerate(gemini()),
  'vertex.generate': () => genaiGenerate(vertex()),
  'vertex.stream': () => genaiGenerate(vertex(), GEMINI_MODEL, true),
};

// `Package.Class` when the package exports the class under that name.
function publicName(e) {
  const name = e?.constructor?.name;
  if (Anthropic[name] === e.constructor) return `Anthropic.${name}`;
  if (OpenAI[name] === e.constructor) return `OpenAI.${name}`;
  if (e instanceof ApiError && e.constructor === ApiError) return 'genai.ApiError';
  return name ?? typeof e;
}

for (const name of process.argv.slice(2)) {
  const out = { scenario: name };
  try {
    const scenario = SCENARIOS[name];
    if (!scenario) throw new Error(`unknown scenario ${name}`);
    Object.assign(out, await scenario());
  } catch (e) {
    out.error = { type: publicName(e), status: e?.status ?? null, message: String(e?.message ?? e) };
  }
  process.stdout.write(`${JSON.stringify(out)}\n`);
}
