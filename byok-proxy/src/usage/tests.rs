//! The providers' documented answers (plain, streamed, split across reads), and hostile
//! ones.

use super::*;

const JSON: Option<&str> = Some("application/json");
const SSE: Option<&str> = Some("text/event-stream; charset=utf-8");

/// Reads `body` whole, then split in two at every byte, then a byte at a time: every way
/// must read the same.
fn read(endpoint: Endpoint, content_type: Option<&str>, body: &str) -> Reading {
    let meter = || Meter::new(endpoint, content_type, None).expect("metered");
    let mut whole = meter();
    whole.feed(body.as_bytes());
    let expected = whole.reading();
    for at in 0..=body.len() {
        let mut m = meter();
        m.feed(&body.as_bytes()[..at]);
        m.feed(&body.as_bytes()[at..]);
        assert_eq!(m.reading(), expected, "split at byte {at}");
    }
    let mut bytes = meter();
    for b in body.as_bytes() {
        bytes.feed(std::slice::from_ref(b));
    }
    assert_eq!(bytes.reading(), expected, "a byte at a time");
    expected
}

fn tokens(input: u64, output: u64, cached: u64, reasoning: u64) -> Option<Tokens> {
    Some(Tokens {
        input,
        output,
        cached,
        reasoning,
    })
}

#[test]
fn openai_chat_plain_with_cached_and_reasoning_tokens() {
    // The completion text names usage fields: only the top-level object counts.
    let body = r#"{"id":"chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG","object":"chat.completion","created":1741570283,"model":"o4-mini-2025-04-16","choices":[{"index":0,"message":{"role":"assistant","content":"Write \"usage\":{\"prompt_tokens\":999} and {\"model\":\"x\"}","refusal":null,"annotations":[],"usage":{"prompt_tokens":5}},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":1117,"completion_tokens":246,"total_tokens":1363,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":192,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_fc9f1d7035"}"#;
    let r = read(Endpoint::Chat, JSON, body);
    assert_eq!(r.tokens, tokens(1117, 246, 1024, 192));
    assert_eq!(r.model.as_deref(), Some("o4-mini-2025-04-16"));
}

#[test]
fn openai_chat_stream_takes_the_usage_only_chunk_and_skips_done() {
    let body = concat!(
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11,\"prompt_tokens_details\":{\"cached_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );
    let r = read(Endpoint::Chat, SSE, body);
    assert_eq!(r.tokens, tokens(9, 2, 0, 0));
    assert_eq!(r.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
}

#[test]
fn a_stream_without_usage_is_unknown_not_zero() {
    let body = concat!(
        "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        "data: [DONE]\n\n",
    );
    let r = read(Endpoint::Chat, SSE, body);
    assert_eq!(r.tokens, None);
    assert_eq!(r.model.as_deref(), Some("gpt-4o"));
}

#[test]
fn openai_responses_plain_and_streamed() {
    let plain = r#"{"id":"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b","object":"response","created_at":1741476542,"status":"completed","error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"In a peaceful grove...","annotations":[]}]}],"parallel_tool_calls":true,"usage":{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123},"user":null,"metadata":{}}"#;
    let r = read(Endpoint::Responses, JSON, plain);
    assert_eq!(r.tokens, tokens(36, 87, 0, 0));
    assert_eq!(r.model.as_deref(), Some("gpt-4.1-2025-04-14"));

    let stream = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"in_progress\",\"model\":\"o3-2025-04-16\",\"output\":[],\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi \\\"usage\\\"\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"o3-2025-04-16\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":5},\"output_tokens\":311,\"output_tokens_details\":{\"reasoning_tokens\":300},\"total_tokens\":348}}}\n\n",
    );
    let r = read(Endpoint::Responses, SSE, stream);
    assert_eq!(r.tokens, tokens(37, 311, 5, 300));
    assert_eq!(r.model.as_deref(), Some("o3-2025-04-16"));
}

#[test]
fn openai_embeddings_and_completions() {
    let body = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-1.5e-7,0.0028842222]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let r = read(Endpoint::Embeddings, JSON, body);
    assert_eq!(r.tokens, tokens(8, 0, 0, 0));
    assert_eq!(r.model.as_deref(), Some("text-embedding-3-small"));

    let body = r#"{"id":"cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7","object":"text_completion","created":1589478378,"model":"gpt-3.5-turbo-instruct","system_fingerprint":"fp_44709d6fcb","choices":[{"text":"\n\nThis is indeed a test","index":0,"logprobs":null,"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
    let r = read(Endpoint::Completions, JSON, body);
    assert_eq!(r.tokens, tokens(5, 7, 0, 0));
}

#[test]
fn anthropic_plain_counts_cache_reads_and_writes_as_input() {
    let body = r#"{"id":"msg_013Zva2CMHLNnXjNJJKqJ2EF","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"text","text":"Hi! My name is Claude."}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":2095,"cache_creation_input_tokens":100,"cache_read_input_tokens":1500,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":0},"output_tokens":503,"service_tier":"standard","server_tool_use":{"web_search_requests":0}}}"#;
    let r = read(Endpoint::Messages, JSON, body);
    assert_eq!(r.tokens, tokens(3695, 503, 1500, 0));
    assert_eq!(r.model.as_deref(), Some("claude-sonnet-4-5-20250929"));
}

/// Anthropic's documented stream: `message_start` (usage inside `message`), a `ping`, the
/// deltas, `message_delta` with the cumulative output.
#[test]
fn anthropic_stream_takes_the_last_cumulative_values() {
    let body = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude-opus-4-6\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":10,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: ping\n",
        "data: {\"type\": \"ping\"}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"usage: {\\\"output_tokens\\\": 1}\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":10,\"output_tokens\":42}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let r = read(Endpoint::Messages, SSE, body);
    assert_eq!(r.tokens, tokens(35, 42, 10, 0));
    assert_eq!(r.model.as_deref(), Some("claude-opus-4-6"));
}

#[test]
fn gemini_plain_counts_thoughts_as_output() {
    let body = r#"{"candidates":[{"content":{"parts":[{"text":"AI learns patterns from data."}],"role":"model"},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":12,"totalTokenCount":124,"cachedContentTokenCount":4,"thoughtsTokenCount":100,"toolUsePromptTokenCount":4,"promptTokensDetails":[{"modality":"TEXT","tokenCount":8}]},"modelVersion":"gemini-2.5-flash","responseId":"Hhf3aNGhN_uTz7IPxcfhqQU"}"#;
    let r = read(Endpoint::GenerateContent, JSON, body);
    assert_eq!(r.tokens, tokens(12, 112, 4, 100));
    assert_eq!(r.model.as_deref(), Some("gemini-2.5-flash"));
}

/// Gemini's `alt=sse` separates events with CRLF; its usage is cumulative per chunk.
#[test]
fn gemini_sse_stream_with_crlf_takes_the_last_chunk() {
    let chunk = |text: &str, out: u32| {
        format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \"{text}\"}}],\"role\": \"model\"}},\"index\": 0}}],\"usageMetadata\": {{\"promptTokenCount\": 7,\"candidatesTokenCount\": {out},\"totalTokenCount\": {}}},\"modelVersion\": \"gemini-2.0-flash\"}}\r\n\r\n",
            7 + out
        )
    };
    let body = [chunk("The", 1), chunk(" quick", 3), chunk(" fox", 6)].concat();
    let r = read(Endpoint::GenerateContent, SSE, &body);
    assert_eq!(r.tokens, tokens(7, 6, 0, 0));
    assert_eq!(r.model.as_deref(), Some("gemini-2.0-flash"));
}

/// `streamGenerateContent` without `alt=sse`: one JSON array, streamed.
#[test]
fn gemini_json_array_stream() {
    let body = concat!(
        "[{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"A\"}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 4,\"candidatesTokenCount\": 1},\"modelVersion\": \"gemini-2.5-pro\"}\r\n,",
        "\r\n{\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"B\"}],\"role\": \"model\"}}],\"usageMetadata\": {\"promptTokenCount\": 4,\"candidatesTokenCount\": 9,\"thoughtsTokenCount\": 20},\"modelVersion\": \"gemini-2.5-pro\"}\r\n]",
    );
    let r = read(Endpoint::GenerateContent, JSON, body);
    assert_eq!(r.tokens, tokens(4, 29, 0, 20));
}

#[test]
fn token_counting_unmetered_and_unreadable_answers() {
    assert!(Meter::new(Endpoint::TokenCount, JSON, None).is_none());
    assert!(Meter::new(Endpoint::Unmetered, JSON, None).is_none());
    let body = br#"{"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
    // Compressed anyway, or not JSON: counted as without usage, never guessed.
    for (content_type, encoding) in [
        (JSON, Some("gzip")),
        (JSON, Some("br")),
        (Some("text/plain"), None),
        (None, None),
    ] {
        let mut m = Meter::new(Endpoint::Chat, content_type, encoding).expect("metered");
        m.feed(body);
        assert_eq!(m.reading().tokens, None, "{content_type:?} {encoding:?}");
    }
    let mut m = Meter::new(Endpoint::Chat, JSON, Some("identity")).expect("metered");
    m.feed(body);
    assert_eq!(m.reading().tokens, tokens(3, 1, 0, 0));
}

#[test]
fn errors_carry_no_usage() {
    let body = r#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: usage {\"input_tokens\": 5}"}}"#;
    assert_eq!(read(Endpoint::Messages, JSON, body).tokens, None);
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n",
        "event: error\n",
        "data: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
    );
    // What was billed before the error is what was seen.
    assert_eq!(
        read(Endpoint::Messages, SSE, stream).tokens,
        tokens(12, 1, 0, 0)
    );
}

#[test]
fn hostile_answers_neither_panic_nor_grow() {
    // A usage object past the cap is ignored.
    let big = format!(
        "{{\"usage\":{{\"prompt_tokens\":1,\"pad\":\"{}\"}}}}",
        "x".repeat(MAX_CAPTURE)
    );
    let mut m = Meter::new(Endpoint::Chat, JSON, None).expect("metered");
    m.feed(big.as_bytes());
    assert_eq!(m.reading().tokens, None);
    // Deep nesting, unbalanced brackets, stray bytes, wrong types, negative numbers.
    for body in [
        "[".repeat(100_000),
        "]".repeat(1000) + "{\"usage\":{\"prompt_tokens\":3}}",
        "{\"usage\":{\"prompt_tokens\":-3}}".into(),
        "{\"usage\":{\"prompt_tokens\":3.5}}".into(),
        "{\"usage\":\"many\"}".into(),
        "{\"usage\":[1,2]}".into(),
        "\u{0}\u{ff}\"\\".into(),
        "{\"model\":12,\"usage\":{\"prompt_tokens\":18446744073709551615,\"completion_tokens\":1}}"
            .into(),
    ] {
        let mut m = Meter::new(Endpoint::Chat, JSON, None).expect("metered");
        m.feed(body.as_bytes());
        let _ = m.reading();
    }
    // Sums saturate.
    let body = r#"{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":5}}"#;
    let mut m = Meter::new(Endpoint::Messages, JSON, None).expect("metered");
    m.feed(body.as_bytes());
    assert_eq!(m.reading().tokens.map(|t| t.input), Some(u64::MAX));
}

#[test]
fn usage_below_the_top_level_is_not_the_answers() {
    // `usage` under some other top-level member (a tool result, an echoed request).
    let body = r#"{"echo":{"usage":{"prompt_tokens":50}},"data":[{"message":{"usage":{"prompt_tokens":60}}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}"#;
    assert_eq!(read(Endpoint::Chat, JSON, body).tokens, tokens(7, 1, 0, 0));
}

#[test]
fn request_model_is_the_top_level_one() {
    assert_eq!(
        request_model(br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}","model":"y"}],"model":"claude-haiku-4-5","max_tokens":5}"#)
            .as_deref(),
        Some("claude-haiku-4-5")
    );
    assert_eq!(request_model(b"not json"), None);
}

#[test]
fn stream_usage_is_asked_for_only_on_streams_without_stream_options() {
    let with =
        |b: &str| with_stream_usage(b.as_bytes()).map(|v| String::from_utf8(v).expect("utf-8"));
    assert_eq!(
        with(r#" {"model":"gpt-4o","stream":true,"messages":[]}"#).as_deref(),
        Some(
            r#" {"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[]}"#
        )
    );
    // The result is JSON with one stream_options.
    let out = with(r#"{"stream": true}"#).expect("added");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["stream_options"]["include_usage"], true);
    for left in [
        r#"{"model":"gpt-4o","messages":[]}"#,
        r#"{"stream":false}"#,
        r#"{"stream":"true"}"#,
        r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
        r#"{"stream":true,"stream_options":null}"#,
        r#"{"stream":true,"stream":true}"#,
        r#"{"stream":false,"stream":true}"#,
        r#"[{"stream":true}]"#,
        r#"{"stream":true"#,
        "not json \"stream\"",
    ] {
        assert_eq!(with(left), None, "{left}");
    }
}

/// What an application that did not ask for usage gets: the stream without the usage-only
/// chunk, however the events are split across reads; every other byte as sent.
#[test]
fn the_usage_only_chunk_is_taken_out_of_injected_streams() {
    let chunk = |content: &str| {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )
    };
    // Azure's first chunk has no choices and no usage: it stays.
    let filter_results = "data: {\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0}],\"usage\":null}\r\n\r\n";
    let usage = "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
    let body = [
        filter_results,
        &chunk("Hel"),
        &chunk("lo"),
        usage,
        "data: [DONE]\n\n",
    ]
    .concat();
    let expected = [
        filter_results,
        &chunk("Hel"),
        &chunk("lo"),
        "data: [DONE]\n\n",
    ]
    .concat();
    for at in 0..=body.len() {
        let mut f = UsageChunkFilter::default();
        let mut out = f.push(&body.as_bytes()[..at]);
        out.extend(f.push(&body.as_bytes()[at..]));
        out.extend(f.finish());
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            expected,
            "split at {at}"
        );
    }
    // A stream cut mid-event passes what it held at its end.
    let mut f = UsageChunkFilter::default();
    assert!(f.push(b"data: {\"choi").is_empty());
    assert_eq!(f.finish(), b"data: {\"choi");
    // An event past the bound goes on unfiltered, and so does the rest.
    let mut f = UsageChunkFilter::default();
    let big = vec![b'x'; MAX_HELD_EVENT + 1];
    assert_eq!(f.push(&big).len(), big.len());
    assert_eq!(f.push(usage.as_bytes()), usage.as_bytes());
}

/// Attacker review: on a key with a token limit, every way a body can make its answer carry
/// no usage is refused.
#[test]
fn bodies_whose_answers_would_escape_a_token_count() {
    for (body, will_inject, escapes) in [
        (r#"{"stream":true}"#, false, true),
        (r#"{"stream":true}"#, true, false),
        (r#"{"str\u0065am":true}"#, false, true),
        (
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            true,
            true,
        ),
        (r#"{"stream":true,"stream_options":{}}"#, true, true),
        (r#"{"stream":true,"stream_options":null}"#, true, true),
        (
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            false,
            false,
        ),
        (
            r#"{"stream":true,"stream_options":{"include_usage":true,"INCLUDE_USAGE":false}}"#,
            false,
            true,
        ),
        (r#"{"stream":false,"STREAM":true}"#, false, true),
        (
            r#"{"Stream_Options":{"include_usage":false},"stream":true}"#,
            true,
            true,
        ),
        (
            r#"{"model":"o3","input":"x","background":true}"#,
            false,
            true,
        ),
        (
            r#"{"model":"o3","input":"x","background":false}"#,
            false,
            false,
        ),
        (r#"{"stream":false}"#, false, false),
        (r#"{"model":"gpt-4o"}"#, false, false),
        ("[1]", false, true),
    ] {
        assert_eq!(
            escapes_token_count(body.as_bytes(), will_inject).is_some(),
            escapes,
            "{body} (inject: {will_inject})"
        );
    }
    // An escaped `stream` is still injected into.
    assert!(with_stream_usage(br#"{"str\u0065am":true}"#).is_some());
}

/// Attacker review: a hostile upstream drip-feeding one long event a byte at a time costs
/// linear work (each byte searched once), and events framed with CR alone are passed on as
/// they end.
#[test]
fn the_usage_chunk_filter_is_linear_and_knows_every_line_ending() {
    let mut f = UsageChunkFilter::default();
    assert!(f.push(&b"data: x\n".repeat(8 * 1024)).is_empty());
    let t = std::time::Instant::now();
    for _ in 0..20_000 {
        assert!(f.push(b"y").is_empty());
    }
    // Quadratic rescanning of 64 KiB per byte would take seconds even in a debug build.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        t.elapsed()
    );
    for ending in ["\r\r", "\n\n", "\r\n\r\n", "\n\r\n", "\r\n\n"] {
        let event = format!("data: {{\"choices\":[{{\"delta\":{{}}}}],\"usage\":null}}{ending}");
        let mut f = UsageChunkFilter::default();
        assert_eq!(f.push(event.as_bytes()), event.as_bytes(), "{ending:?}");
        // Split anywhere, the same.
        for at in 0..event.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = f.push(&event.as_bytes()[..at]);
            out.extend(f.push(&event.as_bytes()[at..]));
            out.extend(f.finish());
            assert_eq!(out, event.as_bytes(), "{ending:?} split at {at}");
        }
    }
}

/// Attacker review: the probe for `stream_options` builds no tree (a body of many small
/// values once cost ~100x its size).
#[test]
fn a_stream_options_member_of_any_value_leaves_the_body_alone() {
    assert_eq!(
        with_stream_usage(br#"{"stream":true,"stream_options":null}"#),
        None
    );
    assert_eq!(
        with_stream_usage(br#"{"stream":true,"stream_options":1}"#),
        None
    );
    assert_eq!(
        with_stream_usage(br#"{"stream":true,"stream_options":{},"stream_options":{}}"#),
        None
    );
}
