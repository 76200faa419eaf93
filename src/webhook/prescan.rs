//! A cheap first look at an AdmissionReview, before it is parsed into a typed Pod: anyone
//! who can create a labelled pod, or reach the webhook port, chooses what the handler parses,
//! and the patch it answers with grows with containers × keys. The pre-scan walks the raw
//! JSON once without building anything (member names are skipped, arrays counted) and
//! refuses reviews past documented limits before any typed parse or patch. Pure.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::names::PROVIDER_KEYS_ANNOTATION;

/// The most containers (app plus init) an opted-in pod may have.
pub const MAX_CONTAINERS: usize = 100;
/// The most variables the patch may add: keys × containers it adds them to.
pub const MAX_ADDED_VARIABLES: usize = 512;
/// The longest `byok.dev/provider-keys` annotation (16 names of up to 63 characters fit).
pub const MAX_ANNOTATION_BYTES: usize = 2048;
/// The most JSON values (objects, arrays, strings, numbers, ...) in a whole review, old
/// object included: the typed parse costs up to a few hundred bytes a value (an `EnvVar`
/// 360), so this bounds its memory (a real pod of 100 containers holds a few thousand).
pub const MAX_VALUES: usize = 30_000;
/// The most volumes a pod may have: a typed `Volume` is over 3 KiB whatever it holds.
pub const MAX_VOLUMES: usize = 512;

/// What the pre-scan saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Shape {
    pub uid: String,
    pub operation: String,
    /// `group/resource`, e.g. `/pods` for core pods.
    pub resource: String,
    pub sub_resource: String,
    /// Of a `CONNECT`'s options object: the container (exec, attach) and ports
    /// (port-forward).
    pub container: Option<String>,
    pub ports: Vec<i64>,
    /// The object's name and namespace (of a CONNECT: the pod's).
    pub name: String,
    pub namespace: String,
    /// The old object's containers (all kinds) and volumes: parsed too, so bounded too.
    pub old_containers: usize,
    pub old_volumes: usize,
    /// Who asks, as the API server authenticated them.
    pub username: String,
    pub groups: Vec<String>,
    /// Of a TokenRequest (`serviceaccounts/token`): the audiences asked for.
    pub audiences: Vec<String>,
    pub containers: usize,
    pub init_containers: usize,
    /// Names in the provider-keys annotation (commas + 1), if it is there.
    pub key_names: Option<usize>,
    pub annotation_bytes: usize,
    pub ephemeral_containers: usize,
    pub volumes: usize,
    /// JSON values in the whole review.
    pub values: usize,
}

/// Why a review is refused before it is parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error(
        "the pod has {0} containers and init containers; pods using byok keys may have at most {MAX_CONTAINERS}"
    )]
    Containers(usize),
    #[error(
        "the annotation {PROVIDER_KEYS_ANNOTATION} is {0} bytes long; at most {MAX_ANNOTATION_BYTES} are accepted"
    )]
    Annotation(usize),
    #[error("the pod has {0} volumes; pods using byok keys may have at most {MAX_VOLUMES}")]
    Volumes(usize),
    #[error(
        "the review holds more than {MAX_VALUES} JSON values; pods using byok keys must be smaller"
    )]
    Values,
    #[error(
        "{keys} keys for {containers} containers would add {added} variables; at most {MAX_ADDED_VARIABLES} (keys × containers) are added"
    )]
    Variables {
        keys: usize,
        containers: usize,
        added: usize,
    },
}

impl Shape {
    /// The first limit this review passes, if any.
    pub fn check(&self) -> Result<(), Limit> {
        if self.values > MAX_VALUES {
            return Err(Limit::Values);
        }
        let containers = self.containers + self.init_containers + self.ephemeral_containers;
        if containers.max(self.old_containers) > MAX_CONTAINERS {
            return Err(Limit::Containers(containers.max(self.old_containers)));
        }
        if self.volumes.max(self.old_volumes) > MAX_VOLUMES {
            return Err(Limit::Volumes(self.volumes.max(self.old_volumes)));
        }
        if self.annotation_bytes > MAX_ANNOTATION_BYTES {
            return Err(Limit::Annotation(self.annotation_bytes));
        }
        let keys = self.key_names.unwrap_or(0);
        let added = keys.saturating_mul(containers);
        if added > MAX_ADDED_VARIABLES {
            return Err(Limit::Variables {
                keys,
                containers,
                added,
            });
        }
        Ok(())
    }
}

/// Reads the shape of `body`; `Err` is a body that is not JSON or not a review's shape.
pub fn scan(body: &[u8]) -> Result<Shape, String> {
    let review: Review = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not an AdmissionReview: {e}"))?;
    let Some(request) = review.request else {
        return Ok(Shape::default());
    };
    let old_spec = request.old_object.and_then(|o| o.spec);
    let old_count =
        |f: fn(&Spec) -> Option<Count>| old_spec.as_ref().and_then(f).map_or(0, |c| c.0);
    let old_containers = old_count(|s| s.containers)
        + old_count(|s| s.init_containers)
        + old_count(|s| s.ephemeral_containers);
    let old_volumes = old_count(|s| s.volumes);
    let object = request.object.unwrap_or(Object {
        metadata: None,
        spec: None,
        container: None,
        ports: None,
    });
    let resource = request
        .resource
        .map(|r| format!("{}/{}", r.group, r.resource))
        .unwrap_or_default();
    let annotation = object
        .metadata
        .and_then(|m| m.annotations)
        .and_then(|a| a.0);
    let spec = object.spec;
    Ok(Shape {
        uid: request.uid,
        operation: request.operation,
        resource,
        sub_resource: request.sub_resource.unwrap_or_default(),
        container: object.container,
        ports: object.ports.unwrap_or_default(),
        name: request.name,
        namespace: request.namespace,
        old_containers,
        old_volumes,
        username: request
            .user_info
            .as_ref()
            .map(|u| u.username.clone())
            .unwrap_or_default(),
        groups: request.user_info.map(|u| u.groups).unwrap_or_default(),
        audiences: spec
            .as_ref()
            .and_then(|s| s.audiences.clone())
            .unwrap_or_default(),
        containers: spec.as_ref().and_then(|s| s.containers).map_or(0, |c| c.0),
        init_containers: spec
            .as_ref()
            .and_then(|s| s.init_containers)
            .map_or(0, |c| c.0),
        key_names: annotation.map(|(_, names)| names),
        annotation_bytes: annotation.map_or(0, |(bytes, _)| bytes),
        ephemeral_containers: spec
            .as_ref()
            .and_then(|s| s.ephemeral_containers)
            .map_or(0, |c| c.0),
        volumes: spec.as_ref().and_then(|s| s.volumes).map_or(0, |c| c.0),
        values: count_values(body),
    })
}

/// What [`scan`] reads of a review: the fields of this struct and those below, no others
/// (serde skips the rest unparsed).
#[derive(Deserialize)]
struct Review {
    request: Option<Request>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    #[serde(default)]
    uid: String,
    #[serde(default)]
    operation: String,
    #[serde(default)]
    resource: Option<Resource>,
    #[serde(default)]
    sub_resource: Option<String>,
    #[serde(default)]
    user_info: Option<UserInfo>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    object: Option<Object>,
    #[serde(default)]
    old_object: Option<Object>,
}

#[derive(Deserialize)]
struct UserInfo {
    #[serde(default)]
    username: String,
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
struct Resource {
    #[serde(default)]
    group: String,
    #[serde(default)]
    resource: String,
}

#[derive(Deserialize)]
struct Object {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    spec: Option<Spec>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    ports: Option<Vec<i64>>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    annotations: Option<Annotation>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    containers: Option<Count>,
    #[serde(default)]
    init_containers: Option<Count>,
    #[serde(default)]
    ephemeral_containers: Option<Count>,
    #[serde(default)]
    volumes: Option<Count>,
    /// Of a TokenRequest.
    #[serde(default)]
    audiences: Option<Vec<String>>,
}

/// JSON values in `body`, counting stops just past [`MAX_VALUES`]. The body parsed already.
fn count_values(body: &[u8]) -> usize {
    let count = std::cell::Cell::new(0usize);
    let mut de = serde_json::Deserializer::from_slice(body);
    let _ = de::DeserializeSeed::deserialize(Counter(&count), &mut de);
    count.get()
}

/// Counts every value, and gives up (an error) past the limit.
#[derive(Clone, Copy)]
struct Counter<'c>(&'c std::cell::Cell<usize>);

impl Counter<'_> {
    fn one<E: de::Error>(self) -> Result<(), E> {
        let n = self.0.get() + 1;
        self.0.set(n);
        if n > MAX_VALUES {
            return Err(E::custom("too many values"));
        }
        Ok(())
    }
}

impl<'de> de::DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.one()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.one()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }
}

/// The length of an array, its elements skipped.
#[derive(Clone, Copy)]
struct Count(usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(Count(n))
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// Of the annotations, only ours: (bytes, names).
struct Annotation(Option<(usize, usize)>);

impl<'de> Deserialize<'de> for Annotation {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Annotation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of annotations")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Annotation, A::Error> {
                let mut ours = None;
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if name == PROVIDER_KEYS_ANNOTATION {
                        let value: std::borrow::Cow<'de, str> = map.next_value()?;
                        ours = Some((value.len(), value.split(',').count()));
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Annotation(ours))
            }
            fn visit_unit<E>(self) -> Result<Annotation, E> {
                Ok(Annotation(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(containers: usize, init: usize, annotation: &str) -> Vec<u8> {
        let c: Vec<_> = (0..containers)
            .map(|i| json!({"name": format!("c{i}"), "image": "x", "env": [{"name": "A", "value": "b"}]}))
            .collect();
        let ic: Vec<_> = (0..init)
            .map(|i| json!({"name": format!("i{i}")}))
            .collect();
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u1", "operation": "CREATE",
            "object": {"metadata": {"annotations": {"other": "x", PROVIDER_KEYS_ANNOTATION: annotation}},
                       "spec": {"containers": c, "initContainers": ic}}}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn the_shape_is_read_without_parsing_the_pod() {
        let shape = scan(&review(3, 1, "a,b")).expect("shape");
        assert_eq!(
            shape,
            Shape {
                uid: "u1".into(),
                operation: "CREATE".into(),
                containers: 3,
                init_containers: 1,
                key_names: Some(2),
                annotation_bytes: 3,
                values: 37,
                ..Shape::default()
            }
        );
        assert_eq!(shape.check(), Ok(()));
        assert!(scan(b"[]").is_err());
        assert!(scan(b"{").is_err());
        assert_eq!(scan(b"{}"), Ok(Shape::default()));
        let nulls = br#"{"request":{"uid":"u","object":{"metadata":{"annotations":null},"spec":{"containers":null}}}}"#;
        assert_eq!(scan(nulls).expect("shape").containers, 0);
    }

    #[test]
    fn each_limit_refuses_with_its_numbers() {
        assert_eq!(
            scan(&review(3000, 0, "a")).expect("shape").check(),
            Err(Limit::Containers(3000))
        );
        let long = "k".repeat(MAX_ANNOTATION_BYTES + 1);
        assert_eq!(
            scan(&review(1, 0, &long)).expect("shape").check(),
            Err(Limit::Annotation(MAX_ANNOTATION_BYTES + 1))
        );
        let keys = (0..16)
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let err = scan(&review(40, 0, &keys)).expect("shape").check();
        assert_eq!(
            err,
            Err(Limit::Variables {
                keys: 16,
                containers: 40,
                added: 640
            })
        );
        assert!(err.expect_err("refused").to_string().contains("640"));
        assert_eq!(scan(&review(32, 0, &keys)).expect("shape").check(), Ok(()));
        // Small values that the typed parse makes large: volumes, or anything by the many.
        let volumes: Vec<_> = (0..MAX_VOLUMES + 1).map(|_| json!({"name": ""})).collect();
        let body = json!({"request": {"uid": "u", "object": {"spec": {"volumes": volumes}}}});
        let shape = scan(body.to_string().as_bytes()).expect("shape");
        assert_eq!(shape.check(), Err(Limit::Volumes(MAX_VOLUMES + 1)));
        let tolerations: Vec<_> = (0..MAX_VALUES).map(|_| json!({})).collect();
        let body =
            json!({"request": {"uid": "u", "oldObject": {"spec": {"tolerations": tolerations}}}});
        let shape = scan(body.to_string().as_bytes()).expect("shape");
        assert_eq!(shape.check(), Err(Limit::Values));
        assert_eq!(shape.uid, "u");
        // The old object is parsed too: the same limits.
        let volumes: Vec<_> = (0..MAX_VOLUMES + 1).map(|_| json!({"name": ""})).collect();
        let body = json!({"request": {"uid": "u", "operation": "CREATE",
            "oldObject": {"spec": {"volumes": volumes}}}});
        let shape = scan(body.to_string().as_bytes()).expect("shape");
        assert_eq!(shape.check(), Err(Limit::Volumes(MAX_VOLUMES + 1)));
    }
}
