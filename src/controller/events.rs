//! Kubernetes Events, published without a cache. kube's `Recorder` remembers every Event it
//! sent for six minutes to count repeats as a series; the controller never repeats one (each
//! Event marks a change: a key put in service, a new failure reason), so with 10,000 keys that
//! memory would buy nothing.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::events::{Event, EventType};

/// `reportingController` of every Event the operator publishes.
pub const REPORTING_CONTROLLER: &str = "byok.dev/byok-operator";

#[derive(Clone)]
pub struct Publisher {
    client: kube::Client,
    instance: String,
}

impl Publisher {
    /// `instance` is this replica (`reportingInstance`): its pod name when known.
    pub fn new(client: kube::Client, instance: String) -> Publisher {
        Publisher { client, instance }
    }

    /// Publishes one Event about `regarding`.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let now = jiff::Timestamp::now();
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(event_name(regarding.name.as_deref(), now)),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await?;
        Ok(())
    }
}

/// `<object>.<nanoseconds, hex>`, as kubectl and client-go name Events; the object's name is
/// cut so the whole stays a valid name.
fn event_name(object: Option<&str>, now: jiff::Timestamp) -> String {
    let object = object.unwrap_or("byok-operator");
    let cut = object
        .char_indices()
        .nth(200)
        .map_or(object, |(i, _)| &object[..i])
        .trim_end_matches(['.', '-']);
    format!("{cut}.{:x}", now.as_nanosecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_are_valid_for_any_object_name() {
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap_or_default();
        assert_eq!(event_name(Some("k"), now), "k.18fae27693b40000");
        let long = "a".repeat(253);
        let name = event_name(Some(&long), now);
        assert!(name.len() <= 253, "{}", name.len());
        assert_eq!(event_name(None, now), "byok-operator.18fae27693b40000");
    }
}
