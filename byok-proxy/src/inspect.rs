//! One pass over a JSON request body whose model the proxy checks: the body the provider
//! receives must mean what the proxy checked. Pure.
//!
//! JSON parsers disagree where the JSON text is ambiguous: serde_json keeps the last of two
//! members with one name, others keep the first; Go's `encoding/json` (Ollama, many
//! gateways) matches member names without regard to case; serde_json with its `raw_value`
//! feature treats a member named `$serde_json::private::RawValue` specially. A body the
//! proxy read as `{"model": "allowed"}` could reach the provider as another model. So a
//! body is refused when it holds duplicate member names (compared after unescaping) at any
//! depth, a member whose name is a case variant of `model`, or a member name starting with
//! `$serde_json::private::`. Gateways read more models from `models` and `fallbacks`
//! (OpenRouter, LiteLLM): their strings count as models too. What passes is forwarded byte
//! for byte (or with a model spliced in, see [`fill_model`]), never re-encoded.
//!
//! Memory: the body is walked without building a tree. The names of the objects open at
//! once are kept as 64-bit keyed hashes, at most [`MAX_OPEN_MEMBERS`] of them, so a body of
//! `n` bytes costs `n` plus a few MiB at most.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::hash::{BuildHasher, RandomState};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The most member names kept at once (the members of every object open at a point of the
/// walk): bounds the memory of a body that is all names. Real request bodies hold a few
/// hundred.
pub const MAX_OPEN_MEMBERS: usize = 100_000;

/// The member name whose string values are models.
const MODEL: &str = "model";
/// The longest model name accepted (the CRD's `allowedModels` entries are at most 256).
pub const MAX_MODEL_BYTES: usize = 256;

/// Why a body is refused. Messages name the member, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the request body is not valid JSON: {0}")]
    Invalid(String),
    #[error("the request body is not a JSON object")]
    NotAnObject,
    #[error(
        "the request body names member {0:?} twice in one object; providers' parsers disagree on which one counts"
    )]
    Duplicate(String),
    #[error(
        "the request body has a member {0:?}: only the exact name \"model\" is accepted, since some servers match names without regard to case"
    )]
    CaseVariant(String),
    #[error("the request body has a member named {0:?}, which is reserved")]
    Reserved(String),
    #[error("the request body has more than {MAX_OPEN_MEMBERS} members in open objects at once")]
    TooManyMembers,
    #[error("the request body names a model of {0} bytes; at most {MAX_MODEL_BYTES} are accepted")]
    ModelTooLong(usize),
}

/// What a body names as models: every string value of a member named `model`, at any
/// depth, in document order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Models(pub Vec<String>);

/// Walks `body`: refuses the ambiguous shapes above and collects every model it names.
pub fn scan(body: &[u8]) -> Result<Models, BodyError> {
    if first_byte(body) != Some(b'{') {
        // Not an object, or not JSON at all: say which.
        return match serde_json::from_slice::<IgnoredAny>(body) {
            Ok(_) => Err(BodyError::NotAnObject),
            Err(e) => Err(BodyError::Invalid(e.to_string())),
        };
    }
    let state = RefCell::new(State {
        hasher: RandomState::new(),
        open_members: 0,
        models: Vec::new(),
        error: None,
    });
    let mut de = serde_json::Deserializer::from_slice(body);
    let walked = Walk { state: &state }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    let state = state.into_inner();
    match (walked, state.error) {
        (Ok(()), _) => Ok(Models(state.models)),
        // Our own refusal travels through serde as a custom error: report it as it is.
        (Err(_), Some(error)) => Err(error),
        (Err(e), None) => Err(BodyError::Invalid(e.to_string())),
    }
}

fn first_byte(body: &[u8]) -> Option<u8> {
    body.iter().copied().find(|b| !b.is_ascii_whitespace())
}

struct State {
    hasher: RandomState,
    open_members: usize,
    models: Vec<String>,
    error: Option<BodyError>,
}

impl State {
    fn fail<E: de::Error>(&mut self, error: BodyError) -> E {
        let e = E::custom(&error);
        self.error.get_or_insert(error);
        e
    }
}

/// The scalar visits of a walk that only looks at objects, arrays and some strings.
macro_rules! ignore_scalars {
    () => {
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    };
}

/// A value anywhere in the body.
#[derive(Clone, Copy)]
struct Walk<'s> {
    state: &'s RefCell<State>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// The value of a member named `model` (or a model list): a string is a model; in a list,
/// so is each string element; anything else is walked.
struct ModelValue<'s> {
    walk: Walk<'s>,
    list: bool,
}

impl<'de> DeserializeSeed<'de> for ModelValue<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ModelValue<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        let mut state = self.walk.state.borrow_mut();
        if v.len() > MAX_MODEL_BYTES {
            return Err(state.fail(BodyError::ModelTooLong(v.len())));
        }
        state.models.push(v.to_owned());
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.walk.visit_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if !self.list {
            return self.walk.visit_seq(seq);
        }
        // Each element of a model list: a string is a model, anything else is walked.
        while seq
            .next_element_seed(ModelValue {
                walk: self.walk,
                list: false,
            })?
            .is_some()
        {}
        Ok(())
    }
    ignore_scalars!();
}

/// What a member's name makes of its value.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Member {
    /// `model`: a string value is a model.
    Model,
    /// A gateway's model list (`models`, `fallbacks`): string values and string elements
    /// are models too (OpenRouter and LiteLLM fall back to them).
    ModelList,
    Other,
}

/// The member names a gateway reads as more models to try.
const MODEL_LISTS: [&str; 2] = ["models", "fallbacks"];

/// A member name: checked where serde_json hands it over (no copy is made, however long),
/// and remembered as a keyed hash in the object's `seen` set.
struct NameSeed<'s, 'm> {
    state: &'s RefCell<State>,
    seen: &'m mut HashSet<u64>,
}

impl<'de> DeserializeSeed<'de> for NameSeed<'_, '_> {
    type Value = Member;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Member, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameSeed<'_, '_> {
    type Value = Member;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_str<E: de::Error>(self, name: &str) -> Result<Member, E> {
        let mut state = self.state.borrow_mut();
        if name.starts_with("$serde_json::private::") {
            return Err(state.fail(BodyError::Reserved(shown(name))));
        }
        let member = if name == MODEL {
            Member::Model
        } else if MODEL_LISTS.contains(&name) {
            Member::ModelList
        } else {
            Member::Other
        };
        // Unicode lower-casing: Go's case-insensitive match also folds a few non-ASCII
        // letters onto ASCII ones.
        if member == Member::Other && name.len() <= 3 * "fallbacks".len() {
            let lower = name.to_lowercase();
            if lower == MODEL || MODEL_LISTS.contains(&lower.as_str()) {
                return Err(state.fail(BodyError::CaseVariant(shown(name))));
            }
        }
        if !self.seen.insert(state.hasher.hash_one(name)) {
            return Err(state.fail(BodyError::Duplicate(shown(name))));
        }
        state.open_members += 1;
        if state.open_members > MAX_OPEN_MEMBERS {
            return Err(state.fail(BodyError::TooManyMembers));
        }
        Ok(member)
    }
}

/// At most this many characters of a member name go into a message.
const SHOWN_NAME: usize = 64;

fn shown(name: &str) -> String {
    name.chars().take(SHOWN_NAME).collect()
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen: HashSet<u64> = HashSet::new();
        let result = (|| {
            while let Some(member) = map.next_key_seed(NameSeed {
                state: self.state,
                seen: &mut seen,
            })? {
                match member {
                    Member::Model => map.next_value_seed(ModelValue {
                        walk: self,
                        list: false,
                    })?,
                    Member::ModelList => map.next_value_seed(ModelValue {
                        walk: self,
                        list: true,
                    })?,
                    Member::Other => map.next_value_seed(self)?,
                }
            }
            Ok(())
        })();
        self.state.borrow_mut().open_members -= seen.len();
        result
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    ignore_scalars!();
}

/// The `model` member of one request object (the body, or a batch request's `params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelMember {
    /// No `model` member; `empty` when the object has no members at all.
    Missing { open_brace: usize, empty: bool },
    /// `"model": null`, at this byte range of its value.
    Null { value: std::ops::Range<usize> },
    /// `"model": "..."`.
    Named(String),
    /// Any other JSON type.
    NotAString,
}

/// Where the object starting at `raw` keeps its `model`. `raw` must be a scanned object.
fn model_member(body: &[u8], raw: &RawValue) -> Result<ModelMember, BodyError> {
    #[derive(Deserialize)]
    struct Obj<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        model: Option<&'a RawValue>,
    }
    fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
        <&RawValue>::deserialize(d).map(Some)
    }
    let text = raw.get();
    let start = offset_in(body, text);
    if first_byte(text.as_bytes()) != Some(b'{') {
        return Err(BodyError::NotAnObject);
    }
    let obj: Obj<'_> = serde_json::from_str(text).map_err(|e| BodyError::Invalid(e.to_string()))?;
    Ok(match obj.model {
        None => {
            let open_brace = start + text.find('{').unwrap_or(0);
            let empty = first_byte(&body[open_brace + 1..]) == Some(b'}');
            ModelMember::Missing { open_brace, empty }
        }
        Some(v) if v.get() == "null" => {
            let at = offset_in(body, v.get());
            ModelMember::Null {
                value: at..at + v.get().len(),
            }
        }
        Some(v) => match serde_json::from_str::<Cow<'_, str>>(v.get()) {
            Ok(m) => ModelMember::Named(m.into_owned()),
            Err(_) => ModelMember::NotAString,
        },
    })
}

/// Byte offset of `part` (a slice of `body` handed out by serde_json) in `body`.
fn offset_in(body: &[u8], part: &str) -> usize {
    (part.as_ptr() as usize).saturating_sub(body.as_ptr() as usize)
}

/// The `model` member of a body that is one request object.
pub fn top_model(body: &[u8]) -> Result<ModelMember, BodyError> {
    let raw: &RawValue =
        serde_json::from_slice(body).map_err(|e| BodyError::Invalid(e.to_string()))?;
    model_member(body, raw)
}

/// The `model` member of each of a message batch's `requests[].params`, or what is wrong.
pub fn batch_models(body: &[u8]) -> Result<Vec<ModelMember>, String> {
    #[derive(Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        requests: Option<Vec<Item<'a>>>,
    }
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    let batch: Batch<'_> = serde_json::from_slice(body)
        .map_err(|_| "a message batch needs a \"requests\" array of objects".to_owned())?;
    let requests = batch
        .requests
        .ok_or_else(|| "a message batch needs a \"requests\" array".to_owned())?;
    requests
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.params
                .ok_or(())
                .and_then(|p| model_member(body, p).map_err(|_| ()))
                .map_err(|()| format!("requests[{i}].params must be an object"))
        })
        .collect()
}

/// `body` with `model` (a JSON string) put where each [`ModelMember`] says, or `None` when
/// the result would be larger than `max` bytes.
pub fn fill_model(
    body: &[u8],
    members: &[ModelMember],
    model: &str,
    max: usize,
) -> Option<Vec<u8>> {
    let quoted = serde_json::to_string(model).ok()?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = members
        .iter()
        .filter_map(|m| match m {
            ModelMember::Missing { open_brace, empty } => {
                let at = open_brace + 1;
                let sep = if *empty { "" } else { "," };
                Some((at..at, format!("\"model\":{quoted}{sep}")))
            }
            ModelMember::Null { value } => Some((value.clone(), quoted.clone())),
            ModelMember::Named(_) | ModelMember::NotAString => None,
        })
        .collect();
    edits.sort_by_key(|(r, _)| r.start);
    let added: usize = edits
        .iter()
        .map(|(r, t)| t.len().saturating_sub(r.len()))
        .sum();
    let size = body.len().checked_add(added)?;
    if size > max {
        return None;
    }
    let mut out = Vec::with_capacity(size);
    let mut at = 0;
    for (range, text) in edits {
        out.extend_from_slice(body.get(at..range.start)?);
        out.extend_from_slice(text.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(body.get(at..)?);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(body: &str) -> Result<Vec<String>, BodyError> {
        scan(body.as_bytes()).map(|m| m.0)
    }

    #[test]
    fn every_model_at_any_depth_is_found() {
        assert_eq!(
            models(r#"{"model":"a","x":{"model":"b","y":[{"model":"c"},{"model":5}]}}"#),
            Ok(vec!["a".into(), "b".into(), "c".into()])
        );
        // Escapes are undone before names and values are compared.
        assert_eq!(
            models(r#"{"mod\u0065l":"gpt-4o\u002dmini"}"#),
            Ok(vec!["gpt-4o-mini".into()])
        );
        assert_eq!(models(r#"{"model_name":"y","modelo":"z"}"#), Ok(vec![]));
        // A gateway's fallback lists.
        assert_eq!(
            models(r#"{"model":"a","models":["b",{"model":"c"}],"fallbacks":["d"]}"#),
            Ok(vec!["a".into(), "b".into(), "c".into(), "d".into()])
        );
        assert_eq!(
            models(r#"{"Models":["b"]}"#),
            Err(BodyError::CaseVariant("Models".into()))
        );
        let long = "m".repeat(MAX_MODEL_BYTES + 1);
        assert_eq!(
            models(&format!(r#"{{"model":"{long}"}}"#)),
            Err(BodyError::ModelTooLong(MAX_MODEL_BYTES + 1))
        );
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        for (body, want) in [
            (
                r#"{"model":"gpt-4o","model":"gpt-4o-mini"}"#,
                BodyError::Duplicate("model".into()),
            ),
            (
                r#"{"model":"a","mod\u0065l":"b"}"#,
                BodyError::Duplicate("model".into()),
            ),
            (
                r#"{"input":[{"a":1,"a":2}]}"#,
                BodyError::Duplicate("a".into()),
            ),
            (
                r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#,
                BodyError::CaseVariant("MODEL".into()),
            ),
            (
                r#"{"x":{"Model":"gpt-4o"}}"#,
                BodyError::CaseVariant("Model".into()),
            ),
            (
                r#"{"model":"a","$serde_json::private::RawValue":"b"}"#,
                BodyError::Reserved("$serde_json::private::RawValue".into()),
            ),
            (r#"["model"]"#, BodyError::NotAnObject),
        ] {
            assert_eq!(models(body), Err(want), "{body}");
        }
        assert!(matches!(models("{\"model\":"), Err(BodyError::Invalid(_))));
        assert!(matches!(models("{} x"), Err(BodyError::Invalid(_))));
        assert!(matches!(models("nope"), Err(BodyError::Invalid(_))));
        // The same name in sibling objects is not a duplicate.
        assert!(models(r#"{"a":{"b":1},"c":{"b":2},"d":[{"b":1},{"b":2}]}"#).is_ok());
    }

    #[test]
    fn names_held_at_once_are_bounded() {
        let mut body = String::from("{");
        for i in 0..=MAX_OPEN_MEMBERS {
            body.push_str(&format!("\"k{i}\":0,"));
        }
        body.push_str("\"end\":0}");
        assert_eq!(models(&body), Err(BodyError::TooManyMembers));
        // Members of closed objects are released.
        let mut body = String::from("[");
        for _ in 0..3 {
            body.push('{');
            for i in 0..MAX_OPEN_MEMBERS / 2 {
                body.push_str(&format!("\"k{i}\":0,"));
            }
            body.push_str("\"end\":0},");
        }
        body.push_str("{}]");
        let body = format!("{{\"all\":{body}}}");
        assert_eq!(models(&body), Ok(vec![]));
    }

    #[test]
    fn a_model_is_spliced_in_and_nothing_else_changes() {
        let body = br#" { "max_tokens" : 5, "messages":[] } "#;
        let m = top_model(body).expect("member");
        assert!(matches!(m, ModelMember::Missing { empty: false, .. }));
        let out = fill_model(body, &[m], "claude-\"x\"", 1 << 20).expect("fits");
        assert_eq!(
            std::str::from_utf8(&out).expect("utf8"),
            r#" {"model":"claude-\"x\"", "max_tokens" : 5, "messages":[] } "#
        );
        let body = br#"{}"#;
        let out = fill_model(body, &[top_model(body).expect("m")], "m", 100).expect("fits");
        assert_eq!(out, br#"{"model":"m"}"#);
        let body = br#"{"a":1,"model" : null}"#;
        let out = fill_model(body, &[top_model(body).expect("m")], "m", 100).expect("fits");
        assert_eq!(out, br#"{"a":1,"model" : "m"}"#);
        assert_eq!(
            top_model(br#"{"model":"x"}"#),
            Ok(ModelMember::Named("x".into()))
        );
        assert_eq!(top_model(br#"{"model":[1]}"#), Ok(ModelMember::NotAString));
        // Too large after filling.
        assert_eq!(
            fill_model(b"{}", &[top_model(b"{}").expect("m")], "m", 5),
            None
        );
    }

    #[test]
    fn batch_params_are_filled_each_in_place() {
        let body = br#"{"requests":[{"custom_id":"a","params":{"max_tokens":1}},{"custom_id":"b","params":{"model":"k"}},{"params":{"model":null}}]}"#;
        let members = batch_models(body).expect("batch");
        assert_eq!(members.len(), 3);
        assert_eq!(members[1], ModelMember::Named("k".into()));
        let out = fill_model(body, &members, "d", 1 << 10).expect("fits");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["requests"][0]["params"]["model"], "d");
        assert_eq!(v["requests"][0]["params"]["max_tokens"], 1);
        assert_eq!(v["requests"][1]["params"]["model"], "k");
        assert_eq!(v["requests"][2]["params"]["model"], "d");
        assert!(batch_models(br#"{"requests":[{"params":[]}]}"#).is_err());
        assert!(batch_models(br#"{"requests":{}}"#).is_err());
        assert!(batch_models(br#"{}"#).is_err());
    }
}
