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

use crate::sidecar::SIDECAR_NAME as SIDECAR;

/// At most this many pods are remembered (one entry is under 200 bytes). Past it, pods that
/// left the selection without being deleted are forgotten first (oldest first), then new
/// pods are not recorded: the update webhook remains the first defence.
const MAX_ENTRIES: usize = 200_000;

/// An entry no longer in the watched selection (its label removed, or not relisted) is kept
/// until a read of the pod shows it gone, asked at most this often per pod: nothing that
/// happens to it while unwatched must be forgiven when it comes back.
pub const CHECK_GONE_EVERY: Duration = Duration::from_secs(15 * 60);

/// At most this many pods are read per round of [`SidecarImages::gone_candidates`].
pub const CHECK_GONE_BATCH: usize = 500;

#[derive(Debug, Default)]
pub struct SidecarImages {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By pod UID.
    pods: HashMap<String, Seen>,
    /// Increases with each relist; entries not seen in the latest count as having left the
    /// selection at its end.
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
                // Not relisted: deleted, or unlabelled, while the watch was away. Which one
                // is for a read of the pod to tell ([`Self::gone_candidates`]).
                let epoch = inner.epoch;
                let unlisted: Vec<String> = inner
                    .pods
                    .iter()
                    .filter(|(_, seen)| seen.epoch != epoch && !seen.left)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in unlisted {
                    inner.mark_left(&uid);
                }
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
                    inner.mark_left(&uid);
                }
            }
        }
    }

    /// Whether the pod's sidecar image has changed since this replica first saw it.
    pub fn swapped(&self, uid: &str) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.pods.get(uid).is_some_and(|seen| seen.swapped)
    }

    /// Pods out of the selection, not checked for [`CHECK_GONE_EVERY`]: (uid, namespace,
    /// name), at most [`CHECK_GONE_BATCH`]. Each is to be read and told to [`Self::checked`].
    pub fn gone_candidates(&self) -> Vec<(String, String, String)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .pods
            .iter()
            .filter(|(_, s)| s.left && s.last_seen.elapsed() >= CHECK_GONE_EVERY)
            .take(CHECK_GONE_BATCH)
            .map(|(uid, s)| (uid.clone(), s.namespace.clone(), s.name.clone()))
            .collect()
    }

    /// A read of the pod: `exists` (same UID) keeps the entry until the next check; gone
    /// (not found, or another pod of that name) forgets it, as a UID never comes back.
    pub fn checked(&self, uid: &str, exists: bool) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if exists {
            if let Some(seen) = inner.pods.get_mut(uid) {
                seen.last_seen = Instant::now();
            }
        } else {
            inner.pods.remove(uid);
        }
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
    /// The pod left the watched selection: remembered until it comes back or is gone.
    fn mark_left(&mut self, uid: &str) {
        let Some(seen) = self.pods.get_mut(uid) else {
            return;
        };
        if seen.left {
            return;
        }
        seen.left = true;
        seen.last_seen = Instant::now();
        self.left_order.push_back(uid.to_owned());
        // A pod that leaves and comes back again and again is queued each time.
        if self.left_order.len() > MAX_ENTRIES {
            let mut queued = std::collections::HashSet::new();
            let pods = &self.pods;
            self.left_order
                .retain(|uid| pods.get(uid).is_some_and(|s| s.left) && queued.insert(uid.clone()));
        }
    }

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
        // Full: forget the oldest pod that left and was not swapped (a swapped one is never
        // forgotten while it exists); none such: this pod goes unrecorded.
        while self.pods.len() >= MAX_ENTRIES {
            let Some(oldest) = self.left_order.pop_front() else {
                return;
            };
            if self.pods.get(&oldest).is_some_and(|s| s.left && !s.swapped) {
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
    fn a_label_toggled_forever_costs_bounded_memory() {
        let images = SidecarImages::default();
        let p = at_generation(pod("u1", "proxy:1", true), Some(1));
        for _ in 0..MAX_ENTRIES + 10 {
            images.observe(&watcher::Event::Delete(p.clone()));
            images.observe(&watcher::Event::Apply(p.clone()));
        }
        let inner = images.inner.lock().unwrap();
        assert!(
            inner.left_order.len() <= MAX_ENTRIES,
            "{}",
            inner.left_order.len()
        );
        assert_eq!(inner.pods.len(), 1);
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
        // A relist that no longer has u2 (deleted, or unlabelled: unknown until it is read);
        // u3 is still there, and still swapped.
        images.observe(&watcher::Event::Init);
        images.observe(&watcher::Event::InitApply(pod("u3", "evil:1", true)));
        images.observe(&watcher::Event::InitDone);
        assert_eq!(images.len(), 2);
        assert!(images.swapped("u3"));
        assert!(
            images.gone_candidates().is_empty(),
            "not read before {CHECK_GONE_EVERY:?}"
        );
        images.checked("u2", true);
        assert_eq!(images.len(), 2, "still there: kept");
        images.checked("u2", false);
        assert_eq!(images.len(), 1, "gone: forgotten");
        assert!(images.swapped("u3"));
    }
}
