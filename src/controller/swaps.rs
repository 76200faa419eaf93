//! Sidecar images seen per pod, so that a swap and a restore are not forgiven.
//!
//! A `byok-proxy` image can change on a running pod (images are the one mutable part of a
//! container), and a native sidecar restarts with the new image. `update.byok.dev` refuses
//! such changes at the API server; where it was bypassed (removed, or a cluster without it),
//! the swapped image may have read the sidecar's token, which stays valid for up to ten
//! minutes, and a restore would make the pod look injected again. So a pod whose sidecar
//! image was ever seen to change is never served again: the broker asks [`SidecarImages`].
//!
//! What is seen is what this replica's pod watch saw since it started: a swap and restore
//! made entirely while the operator was down is not known (the update webhook is what
//! covers that). Removing the inject label for the swap does not hide it: a pod that leaves
//! the watched selection without being deleted keeps its entry until the next relist.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::names;

/// The sidecar's container name (as [`crate::webhook::patch::SIDECAR_NAME`]).
const SIDECAR: &str = "byok-proxy";

/// At most this many pods are remembered (one entry is under 200 bytes). Past it, pods that
/// left the selection without being deleted are forgotten first, then new pods are not
/// recorded: the update webhook remains the first defence.
const MAX_ENTRIES: usize = 200_000;

#[derive(Debug, Default)]
pub struct SidecarImages {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By pod UID.
    pods: HashMap<String, Seen>,
    /// Increases with each relist; entries not seen in the latest are dropped at its end.
    epoch: u64,
}

#[derive(Debug)]
struct Seen {
    image: Option<String>,
    swapped: bool,
    epoch: u64,
    /// Left the watched selection (label removed) without being deleted.
    left: bool,
    namespace: String,
    name: String,
}

impl SidecarImages {
    /// Records one event of the opted-in pods' watch.
    pub fn observe(&self, event: &watcher::Event<Pod>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Init => inner.epoch += 1,
            watcher::Event::InitDone => {
                let epoch = inner.epoch;
                inner.pods.retain(|_, seen| seen.epoch == epoch);
            }
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => inner.record(pod),
            watcher::Event::Delete(pod) => {
                let Some(uid) = pod.metadata.uid.as_deref() else {
                    return;
                };
                if names::opts_in(pod.metadata.labels.as_ref()) {
                    // Deleted for real.
                    inner.pods.remove(uid);
                } else {
                    // The label was removed: remember what it ran, to compare on its return.
                    inner.record(pod);
                    if let Some(seen) = inner.pods.get_mut(uid) {
                        seen.left = true;
                    }
                }
            }
        }
    }

    /// Whether the pod's sidecar image has changed since this replica first saw it.
    pub fn swapped(&self, uid: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pods.get(uid).is_some_and(|seen| seen.swapped)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .len()
    }
}

impl Inner {
    fn record(&mut self, pod: &Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let image = sidecar_image(pod);
        let epoch = self.epoch;
        if let Some(seen) = self.pods.get_mut(&uid) {
            if seen.image != image && !seen.swapped {
                seen.swapped = true;
                tracing::warn!(
                    namespace = %seen.namespace,
                    pod = %seen.name,
                    "the byok-proxy image of this pod changed after creation: the key broker no longer serves it (recreate the pod)"
                );
            }
            seen.image = image;
            seen.epoch = epoch;
            seen.left = false;
            return;
        }
        if self.pods.len() >= MAX_ENTRIES {
            let left = self
                .pods
                .iter()
                .find(|(_, s)| s.left)
                .map(|(u, _)| u.clone());
            match left {
                Some(forget) => {
                    self.pods.remove(&forget);
                }
                None => return,
            }
        }
        self.pods.insert(
            uid,
            Seen {
                image,
                swapped: false,
                epoch,
                left: false,
                namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                name: pod.metadata.name.clone().unwrap_or_default(),
            },
        );
    }
}

/// The image of the pod's `byok-proxy` container, wherever it is.
fn sidecar_image(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .find(|c| c.name == SIDECAR)
        .and_then(|c| c.image.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(uid: &str, image: &str, labelled: bool) -> Pod {
        let labels = if labelled {
            json!({names::INJECT_LABEL: names::INJECT_VALUE})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "uid": uid, "labels": labels},
            "spec": {
                "initContainers": [{"name": SIDECAR, "image": image}],
                "containers": [{"name": "app", "image": "app:1"}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_swap_and_a_restore_leave_the_pod_swapped() {
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u2", "proxy:1", true)));
        // Ordinary updates (status, labels) keep the image: nothing changes.
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        assert!(!images.swapped("u1"));
        images.observe(&watcher::Event::Apply(pod("u1", "evil:1", true)));
        assert!(images.swapped("u1"));
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        assert!(images.swapped("u1"), "the restore is not forgiven");
        assert!(!images.swapped("u2"));
        assert!(!images.swapped("unknown"));
    }

    #[test]
    fn leaving_the_selection_for_the_swap_does_not_hide_it() {
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        // Label removed: the watch says Delete, with the label gone.
        images.observe(&watcher::Event::Delete(pod("u1", "proxy:1", false)));
        // Swapped while outside the selection (unseen), restored, labelled again.
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        assert!(!images.swapped("u1"), "nothing was seen to change");
        images.observe(&watcher::Event::Delete(pod("u1", "proxy:1", false)));
        images.observe(&watcher::Event::Apply(pod("u1", "evil:1", true)));
        assert!(images.swapped("u1"));
    }

    #[test]
    fn deleted_pods_and_pods_gone_during_a_relist_are_forgotten() {
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u2", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u3", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u3", "evil:1", true)));
        images.observe(&watcher::Event::Delete(pod("u1", "proxy:1", true)));
        assert_eq!(images.len(), 2);
        // A relist that no longer has u2; u3 is still there, and still swapped.
        images.observe(&watcher::Event::Init);
        images.observe(&watcher::Event::InitApply(pod("u3", "evil:1", true)));
        images.observe(&watcher::Event::InitDone);
        assert_eq!(images.len(), 1);
        assert!(images.swapped("u3"));
    }
}
