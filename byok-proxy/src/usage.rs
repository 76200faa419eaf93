//! Token usage, read from the provider's answers as they stream past. Pure: no IO, no
//! clock, no text kept.
//!
//! Every provider reports usage in its answer: a `usage` object (OpenAI shapes, Anthropic),
//! `usageMetadata` (Gemini). The [`Meter`] watches the answer's bytes on their way to the
//! application and keeps only those objects and the answer's model name: never a prompt or
//! a completion, never more than [`MAX_CAPTURE`] bytes at once, whatever the answer's size.
//! Nothing is buffered or delayed: the bytes go on unchanged while the meter reads them.
//!
//! One rule for every provider and endpoint (`docs/usage.md` has the table):
//! - input = every input token, cached ones included (cached is also reported on its own);
//! - output = every billed output token, reasoning and thinking included (reasoning is also
//!   reported on its own where the provider separates it);
//! - a stream takes the last value of each field (Anthropic's `message_delta` and Gemini's
//!   `usageMetadata` are cumulative; OpenAI sends usage once, in its last chunk);
//! - token-counting endpoints record nothing.
//!
//! An answer that carries no usage (a stream asked for without
//! `stream_options.include_usage`, an error) is *unknown*, never zero.

use serde::Deserialize;

/// The largest usage object or model name kept; a bigger one is ignored (no real one comes
/// near: usage objects are a few hundred bytes).
pub const MAX_CAPTURE: usize = 16 * 1024;

/// How deep a JSON answer's containers are tracked; below that the meter only counts
/// depth (usage is at depth one or two).
const MAX_TRACKED_DEPTH: u32 = 128;

/// What a routed request's answer says about tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// No tokens in the answer (listings, files, batches, images, audio, moderations...).
    Unmetered,
    /// Counts tokens without spending any (`count_tokens`, `countTokens`,
    /// `responses/input_tokens`): records nothing.
    TokenCount,
    /// OpenAI-shaped chat completions: OpenAI, openai-compatible, Azure, Vertex's
    /// OpenAI-compatible endpoint.
    Chat,
    /// OpenAI-shaped legacy completions.
    Completions,
    /// The OpenAI Responses API (OpenAI, Azure).
    Responses,
    /// OpenAI-shaped embeddings.
    Embeddings,
    /// Anthropic messages: Anthropic, and Vertex's `rawPredict`/`streamRawPredict`.
    Messages,
    /// Gemini `generateContent`/`streamGenerateContent`: Google and Vertex.
    GenerateContent,
}

impl Endpoint {
    /// Whether answers of this endpoint are read for usage.
    pub fn metered(self) -> bool {
        !matches!(self, Endpoint::Unmetered | Endpoint::TokenCount)
    }

    /// OpenTelemetry's `gen_ai.operation.name` (semantic conventions v1.37.0).
    pub fn operation(self) -> &'static str {
        match self {
            Endpoint::Chat | Endpoint::Responses | Endpoint::Messages => "chat",
            Endpoint::Completions => "text_completion",
            Endpoint::Embeddings => "embeddings",
            Endpoint::GenerateContent => "generate_content",
            Endpoint::Unmetered | Endpoint::TokenCount => "other",
        }
    }
}

/// One answer's tokens, after the rule above.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Every input token, cached included.
    pub input: u64,
    /// Every billed output token, reasoning included.
    pub output: u64,
    /// Input tokens read from a cache (part of `input`).
    pub cached: u64,
    /// Reasoning or thinking tokens (part of `output`), where the provider separates them.
    pub reasoning: u64,
}

/// The usage fields of every provider, each optional: a later object overwrites only the
/// fields it carries (`null` carries none).
#[derive(Debug, Clone, Default, Deserialize)]
struct RawUsage {
    // OpenAI chat, completions, embeddings.
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    // OpenAI responses, Anthropic.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
    // Anthropic.
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    // Gemini.
    #[serde(rename = "promptTokenCount")]
    prompt_token_count: Option<u64>,
    #[serde(rename = "candidatesTokenCount")]
    candidates_token_count: Option<u64>,
    #[serde(rename = "cachedContentTokenCount")]
    cached_content_token_count: Option<u64>,
    #[serde(rename = "thoughtsTokenCount")]
    thoughts_token_count: Option<u64>,
    #[serde(rename = "toolUsePromptTokenCount")]
    tool_use_prompt_token_count: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl Details {
    fn merge(old: Option<Details>, new: Option<Details>) -> Option<Details> {
        match (old, new) {
            (Some(o), Some(n)) => Some(Details {
                cached_tokens: n.cached_tokens.or(o.cached_tokens),
                reasoning_tokens: n.reasoning_tokens.or(o.reasoning_tokens),
            }),
            (o, n) => n.or(o),
        }
    }
}

impl RawUsage {
    fn merge(&mut self, new: RawUsage) {
        macro_rules! take {
            ($($f:ident),*) => { $( if new.$f.is_some() { self.$f = new.$f; } )* };
        }
        take!(
            prompt_tokens,
            completion_tokens,
            input_tokens,
            output_tokens,
            cache_creation_input_tokens,
            cache_read_input_tokens,
            prompt_token_count,
            candidates_token_count,
            cached_content_token_count,
            thoughts_token_count,
            tool_use_prompt_token_count
        );
        self.prompt_tokens_details =
            Details::merge(self.prompt_tokens_details, new.prompt_tokens_details);
        self.completion_tokens_details = Details::merge(
            self.completion_tokens_details,
            new.completion_tokens_details,
        );
        self.input_tokens_details =
            Details::merge(self.input_tokens_details, new.input_tokens_details);
        self.output_tokens_details =
            Details::merge(self.output_tokens_details, new.output_tokens_details);
    }

    /// The rule, per endpoint. `None` when the fields the endpoint reports are absent.
    fn tokens(&self, endpoint: Endpoint) -> Option<Tokens> {
        let cached = |d: Option<Details>| d.and_then(|d| d.cached_tokens).unwrap_or(0);
        let reasoning = |d: Option<Details>| d.and_then(|d| d.reasoning_tokens).unwrap_or(0);
        let sum = |a: u64, b: u64| a.saturating_add(b);
        match endpoint {
            Endpoint::Chat | Endpoint::Completions | Endpoint::Embeddings => {
                // Some OpenAI-compatible servers answer with the Responses names.
                let input = self.prompt_tokens.or(self.input_tokens)?;
                Some(Tokens {
                    input,
                    output: self.completion_tokens.or(self.output_tokens).unwrap_or(0),
                    cached: cached(self.prompt_tokens_details.or(self.input_tokens_details)),
                    reasoning: reasoning(
                        self.completion_tokens_details
                            .or(self.output_tokens_details),
                    ),
                })
            }
            Endpoint::Responses => Some(Tokens {
                input: self.input_tokens?,
                output: self.output_tokens.unwrap_or(0),
                cached: cached(self.input_tokens_details),
                reasoning: reasoning(self.output_tokens_details),
            }),
            Endpoint::Messages => {
                if self.input_tokens.is_none() && self.output_tokens.is_none() {
                    return None;
                }
                let read = self.cache_read_input_tokens.unwrap_or(0);
                let created = self.cache_creation_input_tokens.unwrap_or(0);
                Some(Tokens {
                    input: sum(sum(self.input_tokens.unwrap_or(0), created), read),
                    output: self.output_tokens.unwrap_or(0),
                    cached: read,
                    reasoning: 0,
                })
            }
            Endpoint::GenerateContent => {
                if self.prompt_token_count.is_none() && self.candidates_token_count.is_none() {
                    return None;
                }
                let thoughts = self.thoughts_token_count.unwrap_or(0);
                Some(Tokens {
                    input: sum(
                        self.prompt_token_count.unwrap_or(0),
                        self.tool_use_prompt_token_count.unwrap_or(0),
                    ),
                    output: sum(self.candidates_token_count.unwrap_or(0), thoughts),
                    cached: self.cached_content_token_count.unwrap_or(0),
                    reasoning: thoughts,
                })
            }
            Endpoint::Unmetered | Endpoint::TokenCount => None,
        }
    }
}

/// What the meter read from one answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    /// `None`: the answer carried no usage.
    pub tokens: Option<Tokens>,
    /// The model the answer names (`model`, Gemini's `modelVersion`).
    pub model: Option<String>,
}

/// What a captured value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Usage,
    Model,
}

/// The member names the scanner tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Name {
    Usage,
    Model,
    /// Anthropic's `message_start` holds the message (and its usage) in `message`.
    Message,
    /// OpenAI's Responses stream events hold the response in `response`.
    Response,
    Other,
}

impl Name {
    fn of(bytes: &[u8]) -> Name {
        match bytes {
            b"usage" | b"usageMetadata" => Name::Usage,
            b"model" | b"modelVersion" => Name::Model,
            b"message" => Name::Message,
            b"response" => Name::Response,
            _ => Name::Other,
        }
    }
}

/// Where the scanner is within a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between tokens.
    Between,
    /// In a string; `name` when it is a member name.
    Str { name: bool, escaped: bool },
    /// In a number or literal.
    Scalar,
}

/// A value being kept.
#[derive(Debug)]
struct Capture {
    target: Target,
    /// The depth its container opened at (`None`: a string or scalar, not a container).
    depth: Option<u32>,
    bytes: Vec<u8>,
}

/// An incremental scan of one JSON document (or an array of them: Gemini's stream without
/// `alt=sse`), keeping the values of `usage`/`usageMetadata` and `model`/`modelVersion` at
/// its top level and under a top-level `message` or `response`. It does not validate: a
/// malformed document yields values that fail to parse, and are dropped.
#[derive(Debug)]
struct Scanner {
    lex: Lex,
    depth: u32,
    /// Bit `d` set: the container at depth `d + 1` is an object.
    objects: u128,
    /// The next string in the current object is a member name.
    expect_name: bool,
    /// The root is an array whose elements are the documents.
    root_array: bool,
    started: bool,
    /// The member name being read (short names only: longer ones are `Other`).
    name: [u8; 16],
    name_len: usize,
    name_long: bool,
    /// The last member name at the documents' top level.
    top: Name,
    /// A name was just read and matched: its value is kept.
    pending: Option<Target>,
    capture: Option<Capture>,
}

impl Default for Scanner {
    fn default() -> Self {
        Self {
            lex: Lex::Between,
            depth: 0,
            objects: 0,
            expect_name: false,
            root_array: false,
            started: false,
            name: [0; 16],
            name_len: 0,
            name_long: false,
            top: Name::Other,
            pending: None,
            capture: None,
        }
    }
}

/// Values the scanner finished.
#[derive(Debug, Default)]
struct Found {
    usage: Option<RawUsage>,
    model: Option<String>,
}

impl Found {
    fn take(&mut self, target: Target, bytes: &[u8]) {
        match target {
            Target::Usage => {
                if let Ok(Some(new)) = serde_json::from_slice::<Option<RawUsage>>(bytes) {
                    self.usage.get_or_insert_with(RawUsage::default).merge(new);
                }
            }
            Target::Model => {
                if let Ok(model) = serde_json::from_slice::<String>(bytes) {
                    self.model = Some(model);
                }
            }
        }
    }
}

impl Scanner {
    /// The depth of a document's top-level members.
    fn top_depth(&self) -> u32 {
        if self.root_array { 2 } else { 1 }
    }

    fn in_object(&self) -> bool {
        self.depth > 0
            && self.depth <= MAX_TRACKED_DEPTH
            && self.objects & (1u128 << (self.depth - 1)) != 0
    }

    /// The name just read, at the current depth: decides whether its value is kept.
    fn named(&mut self) {
        let name = if self.name_long {
            Name::Other
        } else {
            Name::of(&self.name[..self.name_len])
        };
        let top = self.top_depth();
        if self.depth == top {
            self.top = name;
            self.pending = match name {
                Name::Usage => Some(Target::Usage),
                Name::Model => Some(Target::Model),
                _ => None,
            };
        } else if self.depth == top + 1 {
            self.pending = match (self.top, name) {
                (Name::Message | Name::Response, Name::Usage) => Some(Target::Usage),
                (Name::Message | Name::Response, Name::Model) => Some(Target::Model),
                _ => None,
            };
        }
    }

    fn keep(&mut self, byte: u8) {
        if let Some(c) = &mut self.capture {
            if c.bytes.len() < MAX_CAPTURE {
                c.bytes.push(byte);
            } else {
                // Too big to be a real usage object or model: ignored.
                self.capture = None;
            }
        }
    }

    fn end_capture(&mut self, found: &mut Found) {
        if let Some(c) = self.capture.take() {
            found.take(c.target, &c.bytes);
        }
    }

    /// A value starts with `byte` (not a string's or container's end).
    fn value_starts(&mut self, byte: u8) {
        if let Some(target) = self.pending.take() {
            let depth = matches!(byte, b'{' | b'[').then_some(self.depth + 1);
            self.capture = Some(Capture {
                target,
                depth,
                // Usage objects and model names fit: one allocation.
                bytes: Vec::with_capacity(256),
            });
        }
    }

    fn feed(&mut self, bytes: &[u8], found: &mut Found) {
        let mut i = 0;
        while i < bytes.len() {
            // Most of an answer is string content: take a run of it in one step (kept,
            // added to the name, or skipped), then the byte that ends the run.
            if let Lex::Str {
                name,
                escaped: false,
            } = self.lex
            {
                let rest = &bytes[i..];
                let run = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
                if run > 0 {
                    self.string_run(&rest[..run], name);
                    i += run;
                    continue;
                }
            } else if self.lex == Lex::Scalar {
                let rest = &bytes[i..];
                let run = rest
                    .iter()
                    .position(|b| !is_scalar_byte(*b))
                    .unwrap_or(rest.len());
                if run > 0 {
                    self.keep_all(&rest[..run]);
                    i += run;
                    continue;
                }
            }
            let b = bytes[i];
            i += 1;
            self.byte(b, found);
        }
    }

    /// Bytes of a string with no quote or backslash among them.
    fn string_run(&mut self, run: &[u8], name: bool) {
        if name {
            let room = self.name.len() - self.name_len;
            if run.len() <= room {
                self.name[self.name_len..self.name_len + run.len()].copy_from_slice(run);
                self.name_len += run.len();
            } else {
                self.name_long = true;
            }
        }
        self.keep_all(run);
    }

    fn keep_all(&mut self, run: &[u8]) {
        if let Some(c) = &mut self.capture {
            if c.bytes.len() + run.len() <= MAX_CAPTURE {
                c.bytes.extend_from_slice(run);
            } else {
                self.capture = None;
            }
        }
    }

    fn byte(&mut self, b: u8, found: &mut Found) {
        match self.lex {
            Lex::Str { name, escaped } => {
                if name {
                    if escaped || b == b'\\' {
                        // Escapes in names: no name we look for has one.
                        self.name_long = true;
                    } else if b != b'"' {
                        if self.name_len < self.name.len() {
                            self.name[self.name_len] = b;
                            self.name_len += 1;
                        } else {
                            self.name_long = true;
                        }
                    }
                }
                self.keep(b);
                if escaped {
                    self.lex = Lex::Str {
                        name,
                        escaped: false,
                    };
                } else if b == b'\\' {
                    self.lex = Lex::Str {
                        name,
                        escaped: true,
                    };
                } else if b == b'"' {
                    self.lex = Lex::Between;
                    if name {
                        self.named();
                    } else if self.capture.as_ref().is_some_and(|c| c.depth.is_none()) {
                        self.end_capture(found);
                    }
                }
            }
            Lex::Scalar if is_scalar_byte(b) => self.keep(b),
            Lex::Scalar => {
                self.lex = Lex::Between;
                if self.capture.as_ref().is_some_and(|c| c.depth.is_none()) {
                    self.end_capture(found);
                }
                self.structural(b, found);
            }
            Lex::Between => self.structural(b, found),
        }
    }

    /// A byte between tokens.
    fn structural(&mut self, b: u8, found: &mut Found) {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            return;
        }
        if !self.started {
            self.started = true;
            self.root_array = b == b'[';
        }
        match b {
            b'"' => {
                let name = self.expect_name && self.in_object();
                if name {
                    self.name_len = 0;
                    self.name_long = false;
                    self.expect_name = false;
                } else {
                    self.value_starts(b);
                }
                self.keep(b);
                self.lex = Lex::Str {
                    name,
                    escaped: false,
                };
            }
            b'{' | b'[' => {
                self.value_starts(b);
                self.keep(b);
                self.depth = self.depth.saturating_add(1);
                if self.depth <= MAX_TRACKED_DEPTH {
                    let bit = 1u128 << (self.depth - 1);
                    if b == b'{' {
                        self.objects |= bit;
                    } else {
                        self.objects &= !bit;
                    }
                }
                self.expect_name = b == b'{';
                let top = self.top_depth();
                if self.depth == top {
                    self.top = Name::Other;
                }
            }
            b'}' | b']' => {
                self.keep(b);
                if self
                    .capture
                    .as_ref()
                    .is_some_and(|c| c.depth == Some(self.depth))
                {
                    self.end_capture(found);
                }
                self.depth = self.depth.saturating_sub(1);
                self.expect_name = false;
            }
            b',' => {
                self.keep(b);
                self.expect_name = self.in_object();
            }
            b':' => {
                self.keep(b);
                self.expect_name = false;
            }
            _ => {
                self.value_starts(b);
                self.keep(b);
                self.lex = Lex::Scalar;
            }
        }
    }

    /// The document ended (an SSE event's end): a scalar at its very end is finished.
    fn end(&mut self, found: &mut Found) {
        if self.lex == Lex::Scalar && self.capture.as_ref().is_some_and(|c| c.depth.is_none()) {
            self.end_capture(found);
        }
        *self = Scanner::default();
    }
}

fn is_scalar_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Server-sent events: the `data` of each event is one JSON document.
#[derive(Debug, Default)]
struct Sse {
    /// The start of the current line, up to `data:` (the only field read).
    prefix: [u8; 5],
    prefix_len: usize,
    field: Field,
    /// A `\r` ended the last line: a `\n` right after it ends nothing more.
    after_cr: bool,
    /// The event has data lines so far.
    has_data: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// Reading the field name.
    #[default]
    Name,
    /// In a `data` line, before the optional space after the colon.
    DataStart,
    Data,
    /// Any other line (`event`, `id`, a comment).
    Skip,
}

/// Reads usage from one answer: feed it the body's bytes in order, then [`Meter::reading`].
#[derive(Debug)]
pub struct Meter {
    endpoint: Endpoint,
    /// The answer cannot be read (compressed, or neither JSON nor SSE): it counts as one
    /// without usage.
    blind: bool,
    sse: Option<Sse>,
    scanner: Scanner,
    found: Found,
}

impl Meter {
    /// A meter for an answer of `endpoint`, by its `Content-Type` and `Content-Encoding`;
    /// `None` for endpoints that report no tokens. An answer it cannot read (compressed
    /// although identity was asked for, neither JSON nor SSE) reads as without usage.
    pub fn new(
        endpoint: Endpoint,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> Option<Meter> {
        if !endpoint.metered() {
            return None;
        }
        let compressed =
            content_encoding.is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"));
        let media = content_type
            .and_then(|t| t.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let (sse, readable) = match media.as_str() {
            "text/event-stream" => (Some(Sse::default()), true),
            m if m == "application/json" || m.ends_with("+json") => (None, true),
            _ => (None, false),
        };
        Some(Meter {
            endpoint,
            blind: compressed || !readable,
            sse,
            scanner: Scanner::default(),
            found: Found::default(),
        })
    }

    /// The next bytes of the answer.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.blind {
            return;
        }
        match &mut self.sse {
            None => self.scanner.feed(bytes, &mut self.found),
            Some(sse) => feed_sse(sse, &mut self.scanner, &mut self.found, bytes),
        }
    }

    /// What the answer said so far (call at its end).
    pub fn reading(&mut self) -> Reading {
        if let Some(sse) = &self.sse
            && sse.has_data
        {
            // A stream cut after its last data line but before the blank line.
            self.scanner.end(&mut self.found);
        }
        Reading {
            tokens: self
                .found
                .usage
                .as_ref()
                .and_then(|u| u.tokens(self.endpoint)),
            model: self.found.model.clone(),
        }
    }
}

fn feed_sse(sse: &mut Sse, scanner: &mut Scanner, found: &mut Found, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        if sse.after_cr {
            sse.after_cr = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
                continue;
            }
        }
        match sse.field {
            Field::Data => {
                let end = memchr::memchr2(b'\n', b'\r', bytes).unwrap_or(bytes.len());
                scanner.feed(&bytes[..end], found);
                bytes = &bytes[end..];
                if let Some(&eol) = bytes.first() {
                    line_end(sse, scanner, found, eol);
                    bytes = &bytes[1..];
                }
            }
            Field::Skip => match memchr::memchr2(b'\n', b'\r', bytes) {
                Some(end) => {
                    line_end(sse, scanner, found, bytes[end]);
                    bytes = &bytes[end + 1..];
                }
                None => return,
            },
            Field::DataStart => {
                sse.field = Field::Data;
                if bytes[0] == b' ' {
                    bytes = &bytes[1..];
                }
            }
            Field::Name => {
                let b = bytes[0];
                bytes = &bytes[1..];
                if b == b'\n' || b == b'\r' {
                    // A line that is only a field name (or empty).
                    let data = &sse.prefix[..sse.prefix_len] == b"data";
                    if data {
                        sse.has_data = true;
                        sse.field = Field::Data;
                    }
                    line_end(sse, scanner, found, b);
                } else if b == b':' {
                    if &sse.prefix[..sse.prefix_len] == b"data" {
                        sse.has_data = true;
                        sse.field = Field::DataStart;
                    } else {
                        sse.field = Field::Skip;
                    }
                } else if sse.prefix_len < 4 {
                    sse.prefix[sse.prefix_len] = b;
                    sse.prefix_len += 1;
                } else {
                    sse.field = Field::Skip;
                }
            }
        }
    }
}

/// A line ended with `eol`: a blank line ends the event.
fn line_end(sse: &mut Sse, scanner: &mut Scanner, found: &mut Found, eol: u8) {
    let blank = sse.field == Field::Name && sse.prefix_len == 0;
    if sse.field == Field::Data {
        // Data lines of one event join with a newline: JSON whitespace.
        scanner.feed(b"\n", found);
    }
    if blank && sse.has_data {
        scanner.end(found);
        sse.has_data = false;
    }
    sse.field = Field::Name;
    sse.prefix_len = 0;
    sse.after_cr = eol == b'\r';
}

/// Reads a request body's top-level `model` (for the metrics and the access log), without
/// keeping the body; `None` past [`crate::inspect::MAX_MODEL_BYTES`].
pub fn request_model(body: &[u8]) -> Option<String> {
    let mut scanner = Scanner::default();
    let mut found = Found::default();
    scanner.feed(body, &mut found);
    scanner.end(&mut found);
    found
        .model
        .filter(|m| m.len() <= crate::inspect::MAX_MODEL_BYTES)
}

/// OpenAI's streams report usage only when asked (`stream_options.include_usage`): the body
/// with it added, for a streamed request (`"stream": true`) that has no `stream_options` of
/// its own; `None` leaves the body as sent. The member is spliced in after the opening
/// brace, the rest kept byte for byte. A body whose top level holds `stream` twice (which
/// parsers read differently) is left alone.
pub fn with_stream_usage(body: &[u8]) -> Option<Vec<u8>> {
    /// Any value, `null` included, counts as present.
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| true)
    }
    #[derive(Deserialize)]
    struct Streamed {
        #[serde(default)]
        stream: Option<bool>,
        #[serde(default, deserialize_with = "present")]
        stream_options: bool,
    }
    // Cheap refusal first: most bodies do not stream (an escaped name may hide `stream`).
    if memchr::memmem::find(body, b"\"stream\"").is_none() && memchr::memchr(b'\\', body).is_none()
    {
        return None;
    }
    // One pass, no tree (memory stays the body's): errors on a duplicate `stream` or
    // `stream_options`.
    let probe: Streamed = serde_json::from_slice(body).ok()?;
    if probe.stream != Some(true) || probe.stream_options {
        return None;
    }
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    let mut out = Vec::with_capacity(body.len() + MEMBER.len());
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(MEMBER);
    out.extend_from_slice(&body[open + 1..]);
    Some(out)
}

/// Why the answer to `body` (an OpenAI-shaped generation) would report no usage, if it
/// would: a stream without `stream_options.include_usage: true` (unless the sidecar adds it,
/// `will_inject`), a background response (its usage comes later, to a GET), or member names
/// that parsers read differently (case variants of `stream`, `stream_options`,
/// `include_usage`, `background`: Go's `encoding/json` matches names without regard to
/// case). Names are compared unescaped; the body's duplicate names were refused before.
pub fn escapes_token_count(body: &[u8], will_inject: bool) -> Option<&'static str> {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    const WATCHED: [&str; 3] = ["stream", "stream_options", "background"];
    let Ok(top) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(body) else {
        return Some("the body is not a JSON object the sidecar can read");
    };
    fn variant<'a>(mut names: impl Iterator<Item = &'a String>, watched: &[&str]) -> bool {
        names.any(|n| {
            watched
                .iter()
                .any(|w| n.eq_ignore_ascii_case(w) && n.as_str() != *w)
        })
    }
    if variant(top.keys(), &WATCHED) {
        return Some("the body names stream, stream_options or background in another case");
    }
    let flag = |v: Option<&&RawValue>| v.and_then(|v| serde_json::from_str::<bool>(v.get()).ok());
    if flag(top.get("background")) == Some(true) {
        return Some(
            "a background response reports its usage later, where the sidecar cannot count it",
        );
    }
    if flag(top.get("stream")) != Some(true) {
        return None;
    }
    let Some(options) = top.get("stream_options") else {
        return (!will_inject).then_some(
            "the stream would report no usage: set stream_options.include_usage, or spec.usage.streamUsage: Inject on the ProviderKey",
        );
    };
    let options: BTreeMap<String, &RawValue> =
        serde_json::from_str(options.get()).unwrap_or_default();
    if variant(options.keys(), &["include_usage"]) {
        return Some("stream_options names include_usage in another case");
    }
    (flag(options.get("include_usage")) != Some(true))
        .then_some("the stream would report no usage: set stream_options.include_usage to true")
}

/// The most of one event [`UsageChunkFilter`] holds back; a longer event goes on unfiltered.
const MAX_HELD_EVENT: usize = 1024 * 1024;

/// Takes the usage-only last chunk (`"choices": []` with a `usage`) out of an OpenAI
/// stream whose request the sidecar asked for usage ([`with_stream_usage`]), so the
/// application gets the stream it asked for. Events are passed on whole, as each ends;
/// the other chunks keep their `"usage": null`, which the SDKs read as no usage.
#[derive(Default)]
pub struct UsageChunkFilter {
    /// The start of an event not ended yet (completion text: never printed).
    held: Vec<u8>,
    /// How much of `held` was searched for an event's end already: each byte is searched
    /// once (plus a look-back of two), however the stream is split.
    scanned: usize,
    /// Gave up (an event past [`MAX_HELD_EVENT`]): everything passes.
    open: bool,
}

impl std::fmt::Debug for UsageChunkFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageChunkFilter")
            .field("held", &self.held.len())
            .field("open", &self.open)
            .finish()
    }
}

impl UsageChunkFilter {
    /// The bytes to pass on now, given the next `data`.
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        if self.open {
            return data.to_vec();
        }
        self.held.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        // A blank line may straddle the last push: look back two bytes.
        let mut from = self.scanned.saturating_sub(2);
        while let Some(end) = event_end(&self.held, from) {
            let event = &self.held[start..end];
            if !is_usage_only_chunk(event) {
                out.extend_from_slice(event);
            }
            start = end;
            from = end;
        }
        self.held.drain(..start);
        self.scanned = self.held.len();
        if self.held.len() > MAX_HELD_EVENT {
            self.open = true;
            out.append(&mut self.held);
            self.scanned = 0;
        }
        out
    }

    /// Whether part of an event is held.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// The end of the stream (or a frame that is not data): what is held goes on.
    pub fn finish(&mut self) -> Vec<u8> {
        self.scanned = 0;
        std::mem::take(&mut self.held)
    }
}

/// The end (exclusive, blank line included) of the first event in `bytes` whose blank line
/// starts at or after `from`: `\n\n`, `\n\r\n`, `\r\r`, `\r\n\r\n` and `\r\n\n` all end one (a
/// line ends with CR, LF or CRLF).
fn event_end(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(n) = memchr::memchr2(b'\n', b'\r', bytes.get(i..)?) {
        let at = i + n;
        match &bytes[at..] {
            [b'\r', b'\n', b'\r', b'\n', ..] => return Some(at + 4),
            [b'\n', b'\r', b'\n', ..] | [b'\r', b'\n', b'\n', ..] => return Some(at + 3),
            // `\r\n\r` at the very end may become `\r\n\r\n`: wait for the next byte.
            [b'\r', b'\n', b'\r'] => return None,
            [b'\n', b'\n', ..] | [b'\r', b'\r', ..] => return Some(at + 2),
            _ => i = at + 1,
        }
    }
    None
}

fn is_usage_only_chunk(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<serde::de::IgnoredAny>,
    }
    let text = String::from_utf8_lossy(event);
    let data: String = text
        .split(['\r', '\n'])
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect::<Vec<_>>()
        .join("\n");
    serde_json::from_str::<Chunk>(&data).is_ok_and(|c| c.choices.is_empty() && c.usage.is_some())
}

#[cfg(test)]
mod tests;
