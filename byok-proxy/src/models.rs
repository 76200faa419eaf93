//! `defaultModel` and `allowedModels` on a request. Pure.
//!
//! Only JSON bodies of the endpoints [`ModelAt::Body`] and [`ModelAt::BatchRequests`] name are
//! read, and only when the key has one of the two settings. A body read is first walked by
//! [`inspect::scan`], which refuses bodies that parsers could read differently (duplicate
//! members, case variants of `model`); then, with `allowedModels`, every string member
//! named `model` at any depth must be allowed. The original bytes are forwarded; a default
//! model is spliced in where a request names none, nothing else changes.
//!
//! Models compare exactly, after one normalisation per provider ([`normalise`]) and no
//! other: on gateways a vendor prefix picks the backend, so `azure/gpt-4o-mini` is not
//! `openai/gpt-4o-mini`.

use std::borrow::Cow;

use super::answers::Refusal;
use super::inspect::{self, ModelMember};
use super::routes::ModelAt;
use crate::providers::ProviderKind;

/// The model settings of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPolicy {
    pub provider: ProviderKind,
    pub default_model: Option<String>,
    /// Empty: every model.
    pub allowed_models: Vec<String>,
}

/// What to do with a request before any body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Forward as it is, body streamed.
    Forward,
    /// Read the JSON body (capped) and call [`ModelPolicy::apply`].
    ReadBody,
    /// Answer with this refusal.
    Refuse(Refusal),
}

/// The one normalisation a model name gets before it is compared (documented in
/// `docs/proxy.md`): Gemini's resource prefix `models/`; on Vertex, the resource form
/// `publishers/P/models/M` is `P/M`, and Google's own publisher may be left out
/// (`publishers/google/models/M`, `google/M` and `M` are one model). None for the others.
pub fn normalise(provider: ProviderKind, model: &str) -> Cow<'_, str> {
    match provider {
        ProviderKind::Google => Cow::Borrowed(model.strip_prefix("models/").unwrap_or(model)),
        ProviderKind::Vertex => {
            let short: Cow<'_, str> = match model
                .strip_prefix("publishers/")
                .and_then(|rest| rest.split_once("/models/"))
            {
                Some((publisher, name)) if !publisher.contains('/') => {
                    Cow::Owned(format!("{publisher}/{name}"))
                }
                _ => Cow::Borrowed(model),
            };
            match short.strip_prefix("google/") {
                Some(name) => Cow::Owned(name.to_owned()),
                None => short,
            }
        }
        ProviderKind::Anthropic
        | ProviderKind::OpenAI
        | ProviderKind::OpenAICompatible
        | ProviderKind::Azure => Cow::Borrowed(model),
    }
}

impl ModelPolicy {
    pub fn new(
        provider: ProviderKind,
        default_model: Option<String>,
        allowed_models: Vec<String>,
    ) -> Self {
        ModelPolicy {
            provider,
            default_model,
            allowed_models,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.default_model.is_none() && self.allowed_models.is_empty()
    }

    /// Whether `model` is one of `allowedModels` (empty: every model).
    pub fn allows(&self, model: &str) -> bool {
        if self.allowed_models.is_empty() {
            return true;
        }
        let model = normalise(self.provider, model);
        self.allowed_models
            .iter()
            .any(|a| normalise(self.provider, a) == model)
    }

    /// The decision that needs only the route and the content type.
    pub fn check(&self, model_at: &ModelAt, json_body: bool) -> Check {
        if self.is_empty() {
            return Check::Forward;
        }
        let restricted = !self.allowed_models.is_empty();
        match model_at {
            ModelAt::ReadOnly => Check::Forward,
            ModelAt::Path(model) if self.allows(model) => Check::Forward,
            ModelAt::Path(model) => Check::Refuse(not_allowed(model)),
            ModelAt::Body | ModelAt::BatchRequests if json_body => Check::ReadBody,
            ModelAt::Body | ModelAt::BatchRequests if restricted => {
                Check::Refuse(Refusal::ModelNotAllowed(
                    "only a JSON body (content-type application/json) can have its model checked against this key's allowedModels".into(),
                ))
            }
            ModelAt::Unchecked if restricted => Check::Refuse(Refusal::ModelNotAllowed(
                "this endpoint is not served for a key with allowedModels: its model cannot be checked".into(),
            )),
            ModelAt::Body | ModelAt::BatchRequests | ModelAt::Unchecked => Check::Forward,
        }
    }

    /// Checks (and, for a default model, fills in) a JSON body. Returns the body to forward
    /// (`None`: the original bytes) and the request's model. A filled body larger than
    /// `max` bytes is refused with 413.
    pub fn apply(
        &self,
        model_at: &ModelAt,
        body: &[u8],
        max: u64,
    ) -> Result<(Option<Vec<u8>>, Option<String>), Refusal> {
        let named = inspect::scan(body).map_err(|e| Refusal::BadRequest(e.to_string()))?;
        let members = match model_at {
            ModelAt::BatchRequests => inspect::batch_models(body).map_err(Refusal::BadRequest)?,
            _ => vec![inspect::top_model(body).map_err(|e| Refusal::BadRequest(e.to_string()))?],
        };
        let restricted = !self.allowed_models.is_empty();
        let mut fill = false;
        let mut first = None;
        for (i, member) in members.iter().enumerate() {
            let at = match model_at {
                ModelAt::BatchRequests => format!(" in requests[{i}]"),
                _ => String::new(),
            };
            let model = match member {
                ModelMember::Named(m) => m.clone(),
                ModelMember::NotAString => {
                    return Err(Refusal::BadRequest(format!(
                        "\"model\"{at} must be a string"
                    )));
                }
                ModelMember::Missing { .. } | ModelMember::Null { .. } => {
                    match &self.default_model {
                        Some(default) => {
                            fill = true;
                            default.clone()
                        }
                        None if restricted => {
                            return Err(Refusal::ModelNotAllowed(format!(
                                "the request names no model{at} and the key has no defaultModel"
                            )));
                        }
                        None => continue,
                    }
                }
            };
            if !self.allows(&model) {
                return Err(not_allowed(&model));
            }
            first.get_or_insert(model);
        }
        // Every other string member named `model` (tools, nested requests) too: a server
        // may read any of them.
        if let Some(model) = named.0.iter().find(|m| !self.allows(m)) {
            return Err(not_allowed(model));
        }
        let rewritten = match (&self.default_model, fill) {
            (Some(default), true) => {
                let max = usize::try_from(max).unwrap_or(usize::MAX);
                Some(
                    inspect::fill_model(body, &members, default, max)
                        .ok_or(Refusal::TooLarge(max as u64))?,
                )
            }
            _ => None,
        };
        Ok((rewritten, first))
    }
}

fn not_allowed(model: &str) -> Refusal {
    let shown: String = model.chars().take(128).collect();
    Refusal::ModelNotAllowed(format!(
        "model {shown:?} is not in this key's allowedModels"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const MAX: u64 = 1 << 20;

    fn policy_for(provider: ProviderKind, default: Option<&str>, allowed: &[&str]) -> ModelPolicy {
        ModelPolicy::new(
            provider,
            default.map(str::to_owned),
            allowed.iter().map(|s| (*s).to_owned()).collect(),
        )
    }

    fn policy(default: Option<&str>, allowed: &[&str]) -> ModelPolicy {
        policy_for(ProviderKind::Anthropic, default, allowed)
    }

    fn apply(p: &ModelPolicy, body: serde_json::Value) -> Result<Option<Value>, Refusal> {
        let (new, _) = p.apply(&ModelAt::Body, body.to_string().as_bytes(), MAX)?;
        Ok(new.map(|b| serde_json::from_slice(&b).expect("json")))
    }

    fn apply_raw(p: &ModelPolicy, body: &str) -> Result<Option<Vec<u8>>, Refusal> {
        p.apply(&ModelAt::Body, body.as_bytes(), MAX)
            .map(|(new, _)| new)
    }

    #[test]
    fn nothing_is_read_without_settings() {
        let p = policy(None, &[]);
        for at in [ModelAt::Body, ModelAt::Unchecked, ModelAt::Path("x".into())] {
            assert_eq!(p.check(&at, true), Check::Forward);
        }
    }

    #[test]
    fn default_model_fills_only_a_missing_model() {
        let p = policy(Some("claude-haiku-4-5"), &[]);
        assert_eq!(p.check(&ModelAt::Body, true), Check::ReadBody);
        let new = apply(&p, json!({"max_tokens": 5}))
            .expect("ok")
            .expect("rewritten");
        assert_eq!(new["model"], "claude-haiku-4-5");
        assert_eq!(new["max_tokens"], 5);
        assert_eq!(apply(&p, json!({"model": "other"})).expect("ok"), None);
        // Not JSON, no allowedModels: forwarded untouched.
        assert_eq!(p.check(&ModelAt::Body, false), Check::Forward);
        assert_eq!(p.check(&ModelAt::Unchecked, true), Check::Forward);
    }

    #[test]
    fn allowed_models_refuse_what_they_do_not_name() {
        let p = policy(None, &["gpt-4o-mini"]);
        assert!(apply(&p, json!({"model": "gpt-4o-mini"})).is_ok());
        let err = apply(&p, json!({"model": "gpt-5"})).expect_err("refused");
        assert!(matches!(err, Refusal::ModelNotAllowed(_)));
        assert!(err.message().contains("gpt-5"));
        assert!(matches!(
            apply(&p, json!({"messages": []})),
            Err(Refusal::ModelNotAllowed(_))
        ));
        assert!(matches!(
            apply(&p, json!({"model": 5})),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            p.apply(&ModelAt::Body, b"not json", MAX),
            Err(Refusal::BadRequest(_))
        ));
        assert!(matches!(
            p.check(&ModelAt::Unchecked, true),
            Check::Refuse(Refusal::ModelNotAllowed(_))
        ));
        assert!(matches!(
            p.check(&ModelAt::Body, false),
            Check::Refuse(Refusal::ModelNotAllowed(_))
        ));
        assert_eq!(p.check(&ModelAt::ReadOnly, false), Check::Forward);
        assert_eq!(
            p.check(&ModelAt::Path("gpt-4o-mini".into()), false),
            Check::Forward
        );
        assert!(matches!(
            p.check(&ModelAt::Path("gpt-5".into()), false),
            Check::Refuse(Refusal::ModelNotAllowed(_))
        ));
    }

    #[test]
    fn every_request_of_a_batch_is_checked() {
        let p = policy(Some("claude-haiku-4-5"), &["claude-haiku-4-5"]);
        let body = json!({"requests": [
            {"custom_id": "a", "params": {"max_tokens": 1}},
            {"custom_id": "b", "params": {"model": "claude-haiku-4-5"}},
        ]});
        let (new, _) = p
            .apply(&ModelAt::BatchRequests, body.to_string().as_bytes(), MAX)
            .expect("ok");
        let new: Value = serde_json::from_slice(&new.expect("rewritten")).expect("json");
        assert_eq!(new["requests"][0]["params"]["model"], "claude-haiku-4-5");
        let bad = json!({"requests": [
            {"custom_id": "a", "params": {"model": "claude-haiku-4-5"}},
            {"custom_id": "b", "params": {"model": "claude-opus-4-1"}},
        ]});
        assert!(matches!(
            p.apply(&ModelAt::BatchRequests, bad.to_string().as_bytes(), MAX),
            Err(Refusal::ModelNotAllowed(_))
        ));
    }

    /// The walk-arounds of allowedModels: each was forwarded with the forbidden model.
    #[test]
    fn allowed_models_cannot_be_walked_around() {
        let p = policy_for(ProviderKind::OpenAI, None, &["gpt-4o-mini"]);
        for body in [
            r#"{"model":"gpt-4o","model":"gpt-4o-mini","messages":[]}"#,
            r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#,
            r#"{"model":"gpt-4o-mini","$serde_json::private::RawValue":"x"}"#,
            r#"{"model":"gpt-4o-mini","input":[{"a":1,"a":2}]}"#,
        ] {
            assert!(
                matches!(apply_raw(&p, body), Err(Refusal::BadRequest(_))),
                "{body}"
            );
        }
        // A nested model member names a model too.
        assert!(matches!(
            apply_raw(
                &p,
                r#"{"model":"gpt-4o-mini","tools":[{"model":"gpt-4o"}]}"#
            ),
            Err(Refusal::ModelNotAllowed(_))
        ));
        // On a gateway the vendor prefix picks the backend: exact comparison only.
        let gw = policy_for(
            ProviderKind::OpenAICompatible,
            None,
            &["openai/gpt-4o-mini"],
        );
        for model in [
            "azure/gpt-4o-mini",
            "expensive-backend/gpt-4o-mini",
            "gpt-4o-mini",
            "models/gpt-4o-mini",
            "OpenAI/gpt-4o-mini",
        ] {
            assert!(
                matches!(
                    apply(&gw, json!({"model": model})),
                    Err(Refusal::ModelNotAllowed(_))
                ),
                "{model}"
            );
        }
        assert_eq!(apply(&gw, json!({"model": "openai/gpt-4o-mini"})), Ok(None));
        // What passes is forwarded as it was sent.
        assert_eq!(
            apply_raw(&p, r#"{ "model" : "gpt-4o-mini" , "x": 1.50 }"#),
            Ok(None)
        );
    }

    #[test]
    fn normalisation_is_per_provider_and_documented() {
        let g = policy_for(ProviderKind::Google, None, &["gemini-2.5-flash"]);
        assert!(g.allows("models/gemini-2.5-flash"));
        assert!(!g.allows("google/gemini-2.5-flash"));
        let v = policy_for(
            ProviderKind::Vertex,
            None,
            &["gemini-2.5-flash", "anthropic/claude-x"],
        );
        assert!(v.allows("google/gemini-2.5-flash"));
        assert!(v.allows("publishers/google/models/gemini-2.5-flash"));
        assert!(v.allows("publishers/anthropic/models/claude-x"));
        assert!(!v.allows("claude-x"));
        assert!(!v.allows("publishers/meta/models/gemini-2.5-flash"));
        assert!(!v.allows("models/gemini-2.5-flash"));
        let a = policy_for(ProviderKind::Azure, None, &["prod-4o"]);
        assert!(!a.allows("Prod-4o"));
    }

    #[test]
    fn a_filled_body_past_the_cap_is_refused() {
        let p = policy(Some("claude-haiku-4-5"), &[]);
        assert!(matches!(
            p.apply(&ModelAt::Body, b"{}", 10),
            Err(Refusal::TooLarge(10))
        ));
    }
}
