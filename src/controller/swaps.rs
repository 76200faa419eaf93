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
//! made entirely while no replica was watching is not known (the update webhook is what
//! covers that). Removing the inject label for the swap does not hide it: a pod that leaves
//! the watched selection without being deleted keeps its entry (the watch's `DELETED` for a
//! label change carries the object as it was, label included, so only a deletion timestamp
//! tells a real deletion), also through relists, for longer than a token lives; if it comes
//! back with its spec changed meanwhile (`metadata.generation`, Kubernetes 1.33 and later;
//! on older clusters, whenever it comes back), it counts as swapped. With `update.byok.dev`
//! in place, no pod comes back at all: labelling a pod after creation is refused.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

/// The sidecar's container name (as [`crate::webhook::patch::SIDECAR_NAME`]).
const SIDECAR: &str = "byok-proxy";

/// At most this many pods are remembered (one entry is under 200 bytes). Past it, pods that
/// left the selection without being deleted are forgotten first (oldest first), then new
/// pods are not recorded: the update webhook remains the first defence.
const MAX_ENTRIES: usize = 200_000;

/// How long an entry no longer listed (a pod that left the selection, or one swapped) is
/// kept after it was last seen: longer than a sidecar token lives (600 s).
const KEEP_UNLISTED: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Default)]
pub struct SidecarImages {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By pod UID.
    pods: HashMap<String, Seen>,
    /// Increases with each relist; entries not seen in the latest are dropped at its end
    /// (those that left the selection or were swapped only after [`KEEP_UNLISTED`]).
    epoch: u64,
    /// UIDs of pods that left the selection, oldest first (some may have come back).
    left_order: VecDeque<String>,
}

#[derive(Debug)]
struct Seen {
    image: Option<String>,
    swapped: bool,
    epoch: u64,
    /// Left the watched selection (label removed) without being deleted.
    left: bool,
    /// `metadata.generation` when last seen (`None` before Kubernetes 1.33).
    generation: Option<i64>,
    last_seen: Instant,
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
                inner.pods.retain(|_, seen| {
                    seen.epoch == epoch
                        || ((seen.left || seen.swapped) && seen.last_seen.elapsed() < KEEP_UNLISTED)
                });
                let Inner {
                    pods, left_order, ..
                } = &mut *inner;
                left_order.retain(|uid| pods.contains_key(uid));
            }
            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => inner.record(pod),
            watcher::Event::Delete(pod) => {
                let Some(uid) = pod.metadata.uid.clone() else {
                    return;
                };
                if pod.metadata.deletion_timestamp.is_some() {
                    // Deleted for real (a UID never comes back).
                    inner.pods.remove(&uid);
                } else {
                    // Out of the selection (the label removed; the event carries the object
                    // as it was): remember what it ran, to compare on its return.
                    inner.record(pod);
                    if let Some(seen) = inner.pods.get_mut(&uid) {
                        seen.left = true;
                        inner.left_order.push_back(uid);
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
            let changed_unseen = seen.left
                && (seen.generation.is_none() || seen.generation != pod.metadata.generation);
            if (seen.image != image || changed_unseen) && !seen.swapped {
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
            seen.generation = pod.metadata.generation;
            seen.last_seen = Instant::now();
            return;
        }
        while self.pods.len() >= MAX_ENTRIES {
            let Some(oldest) = self.left_order.pop_front() else {
                return;
            };
            if self.pods.get(&oldest).is_some_and(|s| s.left) {
                self.pods.remove(&oldest);
            }
        }
        self.pods.insert(
            uid,
            Seen {
                image,
                swapped: false,
                epoch,
                left: false,
                generation: pod.metadata.generation,
                last_seen: Instant::now(),
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
    use crate::names;
    use serde_json::json;

    /// As the watch sends a real deletion: with a deletion timestamp.
    fn deleted(uid: &str, image: &str) -> Pod {
        let mut pod = pod(uid, image, true);
        pod.metadata.deletion_timestamp =
            serde_json::from_value(json!("2026-12-07T11:00:00Z")).ok();
        pod
    }

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

    fn at_generation(mut pod: Pod, generation: Option<i64>) -> Pod {
        pod.metadata.generation = generation;
        pod
    }

    #[test]
    fn leaving_the_selection_for_the_swap_does_not_hide_it() {
        let images = SidecarImages::default();
        let seen = |image: &str, generation| at_generation(pod("u1", image, true), generation);
        images.observe(&watcher::Event::Apply(seen("proxy:1", Some(1))));
        // Label removed: the watch says Delete, carrying the object as it was (label and all,
        // no deletion timestamp). Labelled again with nothing changed: not swapped.
        images.observe(&watcher::Event::Delete(seen("proxy:1", Some(1))));
        images.observe(&watcher::Event::Apply(seen("proxy:1", Some(1))));
        assert!(!images.swapped("u1"), "nothing changed");
        // Out again; swapped and restored unseen (two spec changes), labelled again, even
        // after a relist in between.
        images.observe(&watcher::Event::Delete(seen("proxy:1", Some(1))));
        images.observe(&watcher::Event::Init);
        images.observe(&watcher::Event::InitDone);
        images.observe(&watcher::Event::Apply(seen("proxy:1", Some(3))));
        assert!(images.swapped("u1"), "the spec changed while unwatched");

        // Relabelled while still swapped.
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(seen("proxy:1", Some(1))));
        images.observe(&watcher::Event::Delete(seen("proxy:1", Some(1))));
        images.observe(&watcher::Event::Apply(seen("evil:1", Some(2))));
        assert!(images.swapped("u1"));

        // A cluster without pod generations: any return counts.
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(seen("proxy:1", None)));
        images.observe(&watcher::Event::Delete(seen("proxy:1", None)));
        images.observe(&watcher::Event::Apply(seen("proxy:1", None)));
        assert!(images.swapped("u1"));
    }

    #[test]
    fn deleted_pods_and_pods_gone_during_a_relist_are_forgotten() {
        let images = SidecarImages::default();
        images.observe(&watcher::Event::Apply(pod("u1", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u2", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u3", "proxy:1", true)));
        images.observe(&watcher::Event::Apply(pod("u3", "evil:1", true)));
        images.observe(&watcher::Event::Delete(deleted("u1", "proxy:1")));
        assert_eq!(images.len(), 2);
        // A relist that no longer has u2; u3 is still there, and still swapped.
        images.observe(&watcher::Event::Init);
        images.observe(&watcher::Event::InitApply(pod("u3", "evil:1", true)));
        images.observe(&watcher::Event::InitDone);
        assert_eq!(images.len(), 1);
        assert!(images.swapped("u3"));
    }
}
