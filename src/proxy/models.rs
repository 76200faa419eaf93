//! `defaultModel` and `allowedModels` on a request body. Pure.
//!
//! Only JSON bodies of the endpoints [`ModelAt::Body`] and [`ModelAt::BatchRequests`] name are
//! read, and only when the key has one of the two settings; the body is rewritten only when
//! a default model is filled in (the original bytes are forwarded otherwise).

use serde_json::{Map, Value};

use super::answers::Refusal;
use super::routes::{ModelAt, model_allowed};

/// The model settings of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPolicy {
    pub default_model: Option<String>,
    /// Empty: every model.
    pub allowed_models: Vec<String>,
}

/// What to do with a request before any body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Forward as it is, body streamed.
    Forward,
    /// Read the JSON body (capped) and call [`apply`].
    ReadBody,
    /// Answer with this refusal.
    Refuse(Refusal),
}

impl ModelPolicy {
    pub fn is_empty(&self) -> bool {
        self.default_model.is_none() && self.allowed_models.is_empty()
    }

    /// The decision that needs only the route and the content type.
    pub fn check(&self, model_at: &ModelAt, json_body: bool) -> Check {
        if self.is_empty() {
            return Check::Forward;
        }
        let restricted = !self.allowed_models.is_empty();
        match model_at {
            ModelAt::ReadOnly => Check::Forward,
            ModelAt::Path(model) if model_allowed(&self.allowed_models, model) => Check::Forward,
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

    /// Checks (and, for a default model, rewrites) a JSON body. `Ok(None)`: forward the
    /// original bytes; `Ok(Some(new))`: forward `new`.
    pub fn apply(
        &self,
        model_at: &ModelAt,
        body: &[u8],
    ) -> Result<(Option<Vec<u8>>, Option<String>), Refusal> {
        let mut doc: Value = serde_json::from_slice(body)
            .map_err(|e| Refusal::BadRequest(format!("the request body is not valid JSON: {e}")))?;
        let Some(obj) = doc.as_object_mut() else {
            return Err(Refusal::BadRequest(
                "the request body is not a JSON object".into(),
            ));
        };
        let (changed, model) = match model_at {
            ModelAt::BatchRequests => self.apply_batch(obj)?,
            _ => self.apply_one(obj, "")?,
        };
        let rewritten = if changed {
            Some(serde_json::to_vec(&doc).map_err(|e| Refusal::BadRequest(e.to_string()))?)
        } else {
            None
        };
        Ok((rewritten, model))
    }

    /// One request object: fill, then check. Returns (changed, model).
    fn apply_one(
        &self,
        obj: &mut Map<String, Value>,
        at: &str,
    ) -> Result<(bool, Option<String>), Refusal> {
        let (changed, model) = match obj.get("model") {
            Some(Value::String(m)) => (false, m.clone()),
            Some(Value::Null) | None => match &self.default_model {
                Some(default) => {
                    obj.insert("model".into(), Value::String(default.clone()));
                    (true, default.clone())
                }
                None if self.allowed_models.is_empty() => return Ok((false, None)),
                None => {
                    return Err(Refusal::ModelNotAllowed(format!(
                        "the request names no model{at} and the key has no defaultModel"
                    )));
                }
            },
            Some(_) => {
                return Err(Refusal::BadRequest(format!(
                    "\"model\"{at} must be a string"
                )));
            }
        };
        if !model_allowed(&self.allowed_models, &model) {
            return Err(not_allowed(&model));
        }
        Ok((changed, Some(model)))
    }

    fn apply_batch(&self, obj: &mut Map<String, Value>) -> Result<(bool, Option<String>), Refusal> {
        let Some(Value::Array(requests)) = obj.get_mut("requests") else {
            return Err(Refusal::BadRequest(
                "a message batch needs a \"requests\" array".into(),
            ));
        };
        let mut changed = false;
        let mut first = None;
        for (i, request) in requests.iter_mut().enumerate() {
            let Some(params) = request.get_mut("params").and_then(Value::as_object_mut) else {
                return Err(Refusal::BadRequest(format!(
                    "requests[{i}].params must be an object"
                )));
            };
            let (c, model) = self.apply_one(params, &format!(" in requests[{i}]"))?;
            changed |= c;
            first = first.or(model);
        }
        Ok((changed, first))
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
    use serde_json::json;

    fn policy(default: Option<&str>, allowed: &[&str]) -> ModelPolicy {
        ModelPolicy {
            default_model: default.map(str::to_owned),
            allowed_models: allowed.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn apply(p: &ModelPolicy, body: serde_json::Value) -> Result<Option<Value>, Refusal> {
        let (new, _) = p.apply(&ModelAt::Body, body.to_string().as_bytes())?;
        Ok(new.map(|b| serde_json::from_slice(&b).expect("json")))
    }

    #[test]
    fn nothing_is_read_without_settings() {
        let p = ModelPolicy::default();
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
            p.apply(&ModelAt::Body, b"not json"),
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
            .apply(&ModelAt::BatchRequests, body.to_string().as_bytes())
            .expect("ok");
        let new: Value = serde_json::from_slice(&new.expect("rewritten")).expect("json");
        assert_eq!(new["requests"][0]["params"]["model"], "claude-haiku-4-5");
        let bad = json!({"requests": [
            {"custom_id": "a", "params": {"model": "claude-haiku-4-5"}},
            {"custom_id": "b", "params": {"model": "claude-opus-4-1"}},
        ]});
        assert!(matches!(
            p.apply(&ModelAt::BatchRequests, bad.to_string().as_bytes()),
            Err(Refusal::ModelNotAllowed(_))
        ));
    }
}
