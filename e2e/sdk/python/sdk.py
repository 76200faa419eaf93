"""The official Python SDKs against a byok sidecar, as an application in the pod uses them.

Run by e2e/tests/sdk.rs with exactly the environment the webhook gave the pod's app
container (base URLs, placeholder keys, plus the container's own variables): nothing here
names a host, a port, a key or a header. Each argument is a scenario; each prints one JSON
line: {"scenario", "text", "input_tokens", "output_tokens", "deltas"} when the SDK parsed an
answer, {"scenario", "error": {"type", "status", "message"}} when it raised a status error
(`type` is the public name of the exception class, e.g. anthropic.PermissionDeniedError).
"""

import json
import os
import sys

import anthropic
import google.oauth2.credentials
import openai
from google import genai
from google.genai import errors as genai_errors

PROMPT = "Say hello."
ANTHROPIC_MODEL = "claude-sonnet-4-5"
OPENAI_MODEL = "gpt-4o-mini"
GEMINI_MODEL = "gemini-2.5-flash"
# Outside the keys' allowedModels: the sidecar answers 403 itself.
DENIED = {"anthropic": "claude-opus-4-1", "openai": "gpt-4o", "gemini": "gemini-2.5-pro"}
AZURE_DEPLOYMENT = "gpt-4o"


def result(text, input_tokens, output_tokens, deltas=None):
    return {
        "text": text,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "deltas": deltas,
    }


# Retries are the SDKs' default behaviour; a refusal scenario turns them off so that the
# test sees the first answer at once (the sidecar's 503 says retry-after: 5).
def anthropic_client(retries=True):
    return anthropic.Anthropic() if retries else anthropic.Anthropic(max_retries=0)


def anthropic_messages(model=ANTHROPIC_MODEL, retries=True):
    m = anthropic_client(retries).messages.create(
        model=model, max_tokens=64, messages=[{"role": "user", "content": PROMPT}]
    )
    return result(m.content[0].text, m.usage.input_tokens, m.usage.output_tokens)


def anthropic_stream(model=ANTHROPIC_MODEL, retries=True):
    deltas = 0
    with anthropic_client(retries).messages.stream(
        model=model, max_tokens=64, messages=[{"role": "user", "content": PROMPT}]
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                deltas += 1
        m = stream.get_final_message()
    return result(m.content[0].text, m.usage.input_tokens, m.usage.output_tokens, deltas)


def openai_chat(client, model, stream=False):
    messages = [{"role": "user", "content": PROMPT}]
    if not stream:
        c = client.chat.completions.create(model=model, messages=messages)
        u = c.usage
        return result(c.choices[0].message.content, u.prompt_tokens, u.completion_tokens)
    text, deltas, usage = "", 0, None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                text += choice.delta.content
                deltas += 1
    return result(
        text,
        usage.prompt_tokens if usage else None,
        usage.completion_tokens if usage else None,
        deltas,
    )


def openai_responses(model=OPENAI_MODEL, stream=False):
    client = openai.OpenAI()
    if not stream:
        r = client.responses.create(model=model, input=PROMPT)
        return result(r.output_text, r.usage.input_tokens, r.usage.output_tokens)
    deltas, final = 0, None
    for event in client.responses.create(model=model, input=PROMPT, stream=True):
        if event.type == "response.output_text.delta":
            deltas += 1
        elif event.type == "response.completed":
            final = event.response
    return result(final.output_text, final.usage.input_tokens, final.usage.output_tokens, deltas)


def gemini_client():
    # GEMINI_API_KEY and GOOGLE_GEMINI_BASE_URL from the environment; no retries by default.
    return genai.Client()


def vertex_client():
    # docs/injection.md: project and location from the app's own settings, a placeholder
    # token the sidecar replaces with the real access token.
    return genai.Client(
        vertexai=True,
        project=os.environ["GOOGLE_CLOUD_PROJECT"],
        location=os.environ["GOOGLE_CLOUD_LOCATION"],
        credentials=google.oauth2.credentials.Credentials(token="byok-proxy"),
    )


def genai_generate(client, model=GEMINI_MODEL, stream=False):
    if not stream:
        r = client.models.generate_content(model=model, contents=PROMPT)
        u = r.usage_metadata
        return result(r.text, u.prompt_token_count, u.candidates_token_count)
    text, deltas, usage = "", 0, None
    for chunk in client.models.generate_content_stream(model=model, contents=PROMPT):
        deltas += 1
        text += chunk.text or ""
        usage = chunk.usage_metadata or usage
    return result(text, usage.prompt_token_count, usage.candidates_token_count, deltas)


def compat_client():
    # An OpenAI-compatible key: its own BYOK_<NAME>_BASE_URL (the pod's OPENAI_BASE_URL goes
    # to the openai key).
    return openai.OpenAI(base_url=os.environ["BYOK_COMPAT_BASE_URL"])


SCENARIOS = {
    "anthropic.messages": lambda: anthropic_messages(),
    "anthropic.stream": lambda: anthropic_stream(),
    "anthropic.denied": lambda: anthropic_messages(DENIED["anthropic"], retries=False),
    "anthropic.denied.stream": lambda: anthropic_stream(DENIED["anthropic"], retries=False),
    "anthropic.unavailable": lambda: anthropic_messages(retries=False),
    "openai.chat": lambda: openai_chat(openai.OpenAI(), OPENAI_MODEL),
    "openai.chat.stream": lambda: openai_chat(openai.OpenAI(), OPENAI_MODEL, stream=True),
    "openai.responses": lambda: openai_responses(),
    "openai.responses.stream": lambda: openai_responses(stream=True),
    "openai.denied": lambda: openai_chat(openai.OpenAI(max_retries=0), DENIED["openai"]),
    "openai.denied.stream": lambda: openai_chat(
        openai.OpenAI(max_retries=0), DENIED["openai"], stream=True
    ),
    "openai.unavailable": lambda: openai_chat(openai.OpenAI(max_retries=0), OPENAI_MODEL),
    "azure.chat": lambda: openai_chat(openai.AzureOpenAI(), AZURE_DEPLOYMENT),
    "azure.chat.stream": lambda: openai_chat(openai.AzureOpenAI(), AZURE_DEPLOYMENT, stream=True),
    "compat.chat": lambda: openai_chat(compat_client(), OPENAI_MODEL),
    "compat.chat.stream": lambda: openai_chat(compat_client(), OPENAI_MODEL, stream=True),
    "gemini.generate": lambda: genai_generate(gemini_client()),
    "gemini.stream": lambda: genai_generate(gemini_client(), stream=True),
    "gemini.denied": lambda: genai_generate(gemini_client(), DENIED["gemini"]),
    "gemini.denied.stream": lambda: genai_generate(gemini_client(), DENIED["gemini"], True),
    "gemini.unavailable": lambda: genai_generate(gemini_client()),
    "vertex.generate": lambda: genai_generate(vertex_client()),
    "vertex.stream": lambda: genai_generate(vertex_client(), stream=True),
}


def public_name(e):
    """`package.Class` when the package exports the class under that name."""
    for package in (anthropic, openai, genai_errors):
        if getattr(package, type(e).__name__, None) is type(e):
            prefix = "google.genai.errors" if package is genai_errors else package.__name__
            return f"{prefix}.{type(e).__name__}"
    return f"{type(e).__module__}.{type(e).__qualname__}"


def main():
    for name in sys.argv[1:]:
        out = {"scenario": name}
        try:
            out.update(SCENARIOS[name]())
        except (anthropic.APIStatusError, openai.APIStatusError) as e:
            out["error"] = {"type": public_name(e), "status": e.status_code, "message": e.message}
        except genai_errors.APIError as e:
            out["error"] = {"type": public_name(e), "status": e.code, "message": e.message}
        except Exception as e:  # noqa: BLE001 - reported, the test names it
            out["error"] = {"type": public_name(e), "status": None, "message": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
