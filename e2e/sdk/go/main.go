// The official Go SDKs against a byok sidecar, as an application in the pod uses them.
//
// Run by e2e/tests/sdk.rs with exactly the environment the webhook gave the pod's app
// container (base URLs, placeholder keys, plus the container's own variables): nothing here
// names a host, a port, a key or a header. Each argument is a scenario; each prints one JSON
// line: {scenario, text, input_tokens, output_tokens, deltas} when the SDK parsed an answer,
// {scenario, error: {type, status, message}} when it returned a status error (`type` is the
// SDK's error type, e.g. *anthropic.Error).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"cloud.google.com/go/auth"
	"github.com/anthropics/anthropic-sdk-go/v2"
	anthropicoption "github.com/anthropics/anthropic-sdk-go/v2/option"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/azure"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"google.golang.org/genai"
)

const (
	prompt          = "Say hello."
	anthropicModel  = "claude-sonnet-4-5"
	openaiModel     = "gpt-4o-mini"
	geminiModel     = "gemini-2.5-flash"
	azureDeployment = "gpt-4o"
	// Outside the keys' allowedModels: the sidecar answers 403 itself.
	deniedAnthropic = "claude-opus-4-1"
	deniedOpenAI    = "gpt-4o"
	deniedGemini    = "gemini-2.5-pro"
)

type result struct {
	Text         string `json:"text"`
	InputTokens  int64  `json:"input_tokens"`
	OutputTokens int64  `json:"output_tokens"`
	Deltas       *int   `json:"deltas"`
}

func answer(text string, in, out int64, deltas *int) (*result, error) {
	return &result{Text: text, InputTokens: in, OutputTokens: out, Deltas: deltas}, nil
}

// Retries are the SDKs' default; a refusal scenario turns them off so that the test sees the
// first answer at once (the sidecar's 503 says retry-after: 5).
func anthropicClient(retries bool) anthropic.Client {
	if retries {
		return anthropic.NewClient()
	}
	return anthropic.NewClient(anthropicoption.WithMaxRetries(0))
}

func openaiClient(retries bool) openai.Client {
	if retries {
		return openai.NewClient()
	}
	return openai.NewClient(option.WithMaxRetries(0))
}

// The Go SDK reads no Azure variables itself: the app passes the webhook's. It sends a key
// over plain HTTP only with WithUnsafeAllowHTTP, and then only to a loopback address: the
// sidecar's port is one.
func azureClient() openai.Client {
	return openai.NewClient(
		azure.WithEndpoint(os.Getenv("AZURE_OPENAI_ENDPOINT"), os.Getenv("OPENAI_API_VERSION")),
		azure.WithAPIKey(os.Getenv("AZURE_OPENAI_API_KEY")),
		azure.WithUnsafeAllowHTTP(),
	)
}

// An OpenAI-compatible key: its own BYOK_<NAME>_BASE_URL (OPENAI_BASE_URL is the openai key's).
func compatClient() openai.Client {
	return openai.NewClient(option.WithBaseURL(os.Getenv("BYOK_COMPAT_BASE_URL")))
}

// GEMINI_API_KEY and GOOGLE_GEMINI_BASE_URL from the environment.
func geminiClient(ctx context.Context) (*genai.Client, error) {
	return genai.NewClient(ctx, &genai.ClientConfig{Backend: genai.BackendGeminiAPI})
}

// A fixed placeholder token: the sidecar replaces it with the real access token.
type placeholderToken struct{}

func (placeholderToken) Token(context.Context) (*auth.Token, error) {
	return &auth.Token{Value: "byok-proxy", Type: "Bearer", Expiry: time.Now().Add(time.Hour)}, nil
}

// docs/injection.md: project and location from the app's own settings, a placeholder token.
func vertexClient(ctx context.Context) (*genai.Client, error) {
	return genai.NewClient(ctx, &genai.ClientConfig{
		Backend:     genai.BackendVertexAI,
		Project:     os.Getenv("GOOGLE_CLOUD_PROJECT"),
		Location:    os.Getenv("GOOGLE_CLOUD_LOCATION"),
		Credentials: auth.NewCredentials(&auth.CredentialsOptions{TokenProvider: placeholderToken{}}),
	})
}

func anthropicParams(model string) anthropic.MessageNewParams {
	return anthropic.MessageNewParams{
		Model:     anthropic.Model(model),
		MaxTokens: 64,
		Messages:  []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock(prompt))},
	}
}

func anthropicMessages(ctx context.Context, client anthropic.Client, model string) (*result, error) {
	m, err := client.Messages.New(ctx, anthropicParams(model))
	if err != nil {
		return nil, err
	}
	return answer(m.Content[0].Text, m.Usage.InputTokens, m.Usage.OutputTokens, nil)
}

func anthropicStream(ctx context.Context, client anthropic.Client, model string) (*result, error) {
	stream := client.Messages.NewStreaming(ctx, anthropicParams(model))
	defer stream.Close()
	message := anthropic.Message{}
	deltas := 0
	for stream.Next() {
		event := stream.Current()
		if err := message.Accumulate(event); err != nil {
			return nil, err
		}
		if event.Type == "content_block_delta" {
			deltas++
		}
	}
	if err := stream.Err(); err != nil {
		return nil, err
	}
	return answer(message.Content[0].Text, message.Usage.InputTokens, message.Usage.OutputTokens, &deltas)
}

func openaiChat(ctx context.Context, client openai.Client, model string, stream bool) (*result, error) {
	params := openai.ChatCompletionNewParams{
		Model:    model,
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(prompt)},
	}
	if !stream {
		c, err := client.Chat.Completions.New(ctx, params)
		if err != nil {
			return nil, err
		}
		return answer(c.Choices[0].Message.Content, c.Usage.PromptTokens, c.Usage.CompletionTokens, nil)
	}
	params.StreamOptions = openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}
	s := client.Chat.Completions.NewStreaming(ctx, params)
	defer s.Close()
	text, deltas := "", 0
	var usage openai.CompletionUsage
	for s.Next() {
		chunk := s.Current()
		if chunk.JSON.Usage.Valid() {
			usage = chunk.Usage
		}
		for _, choice := range chunk.Choices {
			if choice.Delta.Content != "" {
				text += choice.Delta.Content
				deltas++
			}
		}
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	return answer(text, usage.PromptTokens, usage.CompletionTokens, &deltas)
}

func openaiResponses(ctx context.Context, client openai.Client, stream bool) (*result, error) {
	params := responses.ResponseNewParams{
		Model: openaiModel,
		Input: responses.ResponseNewParamsInputUnion{OfString: openai.String(prompt)},
	}
	if !stream {
		r, err := client.Responses.New(ctx, params)
		if err != nil {
			return nil, err
		}
		return answer(r.OutputText(), r.Usage.InputTokens, r.Usage.OutputTokens, nil)
	}
	s := client.Responses.NewStreaming(ctx, params)
	defer s.Close()
	deltas := 0
	var final *responses.Response
	for s.Next() {
		event := s.Current()
		switch event.Type {
		case "response.output_text.delta":
			deltas++
		case "response.completed":
			completed := event.AsResponseCompleted()
			final = &completed.Response
		}
	}
	if err := s.Err(); err != nil {
		return nil, err
	}
	if final == nil {
		return nil, errors.New("no response.completed event")
	}
	return answer(final.OutputText(), final.Usage.InputTokens, final.Usage.OutputTokens, &deltas)
}

func genaiGenerate(ctx context.Context, client *genai.Client, err error, model string, stream bool) (*result, error) {
	if err != nil {
		return nil, err
	}
	if !stream {
		r, err := client.Models.GenerateContent(ctx, model, genai.Text(prompt), nil)
		if err != nil {
			return nil, err
		}
		u := r.UsageMetadata
		return answer(r.Text(), int64(u.PromptTokenCount), int64(u.CandidatesTokenCount), nil)
	}
	text, deltas := "", 0
	var usage *genai.GenerateContentResponseUsageMetadata
	for chunk, err := range client.Models.GenerateContentStream(ctx, model, genai.Text(prompt), nil) {
		if err != nil {
			return nil, err
		}
		deltas++
		text += chunk.Text()
		if chunk.UsageMetadata != nil {
			usage = chunk.UsageMetadata
		}
	}
	if usage == nil {
		return nil, errors.New("no usage metadata")
	}
	return answer(text, int64(usage.PromptTokenCount), int64(usage.CandidatesTokenCount), &deltas)
}

func scenario(ctx context.Context, name string) (*result, error) {
	switch name {
	case "anthropic.messages":
		return anthropicMessages(ctx, anthropicClient(true), anthropicModel)
	case "anthropic.stream":
		return anthropicStream(ctx, anthropicClient(true), anthropicModel)
	case "anthropic.denied":
		return anthropicMessages(ctx, anthropicClient(false), deniedAnthropic)
	case "anthropic.denied.stream":
		return anthropicStream(ctx, anthropicClient(false), deniedAnthropic)
	case "anthropic.unavailable":
		return anthropicMessages(ctx, anthropicClient(false), anthropicModel)
	case "openai.chat":
		return openaiChat(ctx, openaiClient(true), openaiModel, false)
	case "openai.chat.stream":
		return openaiChat(ctx, openaiClient(true), openaiModel, true)
	case "openai.responses":
		return openaiResponses(ctx, openaiClient(true), false)
	case "openai.responses.stream":
		return openaiResponses(ctx, openaiClient(true), true)
	case "openai.denied":
		return openaiChat(ctx, openaiClient(false), deniedOpenAI, false)
	case "openai.denied.stream":
		return openaiChat(ctx, openaiClient(false), deniedOpenAI, true)
	case "openai.unavailable":
		return openaiChat(ctx, openaiClient(false), openaiModel, false)
	case "azure.chat":
		return openaiChat(ctx, azureClient(), azureDeployment, false)
	case "azure.chat.stream":
		return openaiChat(ctx, azureClient(), azureDeployment, true)
	case "compat.chat":
		return openaiChat(ctx, compatClient(), openaiModel, false)
	case "compat.chat.stream":
		return openaiChat(ctx, compatClient(), openaiModel, true)
	case "gemini.generate", "gemini.unavailable":
		client, err := geminiClient(ctx)
		return genaiGenerate(ctx, client, err, geminiModel, false)
	case "gemini.stream":
		client, err := geminiClient(ctx)
		return genaiGenerate(ctx, client, err, geminiModel, true)
	case "gemini.denied":
		client, err := geminiClient(ctx)
		return genaiGenerate(ctx, client, err, deniedGemini, false)
	case "gemini.denied.stream":
		client, err := geminiClient(ctx)
		return genaiGenerate(ctx, client, err, deniedGemini, true)
	case "vertex.generate":
		client, err := vertexClient(ctx)
		return genaiGenerate(ctx, client, err, geminiModel, false)
	case "vertex.stream":
		client, err := vertexClient(ctx)
		return genaiGenerate(ctx, client, err, geminiModel, true)
	}
	return nil, fmt.Errorf("unknown scenario %s", name)
}

type failure struct {
	Type    string `json:"type"`
	Status  *int   `json:"status"`
	Message string `json:"message"`
}

// The SDK's own error type, its status and message.
func describe(err error) failure {
	var anthropicErr *anthropic.Error
	var openaiErr *openai.Error
	var genaiErr genai.APIError
	switch {
	case errors.As(err, &anthropicErr):
		return failure{"*anthropic.Error", &anthropicErr.StatusCode, anthropicErr.Message}
	case errors.As(err, &openaiErr):
		return failure{"*openai.Error", &openaiErr.StatusCode, openaiErr.Message}
	case errors.As(err, &genaiErr):
		return failure{"genai.APIError", &genaiErr.Code, genaiErr.Message}
	}
	return failure{fmt.Sprintf("%T", err), nil, err.Error()}
}

func main() {
	ctx := context.Background()
	out := json.NewEncoder(os.Stdout)
	for _, name := range os.Args[1:] {
		line := map[string]any{"scenario": name}
		r, err := scenario(ctx, name)
		if err != nil {
			line["error"] = describe(err)
		} else {
			line["text"] = r.Text
			line["input_tokens"] = r.InputTokens
			line["output_tokens"] = r.OutputTokens
			line["deltas"] = r.Deltas
		}
		if err := out.Encode(line); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}
