//! `hack/node-ns.sh` leaves the machine as it found it: the tests with real pods run a kubelet
//! that rewrites global sysctls, creates cgroups, a bridge and mounts, and starts processes.
//! Here a stand-in command does all of that, and the script is stopped as CI or a person
//! would stop it (SIGTERM) or killed outright (SIGKILL).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../hack/node-ns.sh");
const SYSCTLS: [&str; 2] = ["kernel.panic", "vm.overcommit_memory"];
const CGROUP: &str = "/sys/fs/cgroup/pids/kubepods";

fn sysctl(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Host processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) && !cmdline.contains("sh -c") {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Run {
    child: Child,
    marker: String,
    ready: PathBuf,
}

/// Starts the script with a command that changes what a kubelet changes, and waits until it
/// has.
fn start(dir: &Path) -> Run {
    let marker = format!("{}", 1_000_000 + rand::random::<u32>() % 1_000_000);
    let ready = dir.join(format!("ready-{marker}"));
    let inner = format!(
        "set -e
         sysctl -qw kernel.panic=77 vm.overcommit_memory=1
         mkdir -p {CGROUP}/byok-teardown-test
         sleep {marker} &
         echo $! > {CGROUP}/byok-teardown-test/cgroup.procs
         ip link add byok-cni-test type bridge
         touch {ready}
         wait",
        ready = ready.display()
    );
    let child = Command::new(SCRIPT)
        .args(["sh", "-c", &inner])
        .spawn()
        .expect("starting hack/node-ns.sh");
    wait_until("the stand-in kubelet", Duration::from_secs(20), || {
        ready.exists()
    });
    assert_eq!(
        processes_with(&marker).len(),
        1,
        "the stand-in process runs"
    );
    Run {
        child,
        marker,
        ready,
    }
}

fn assert_nothing_left(run: &Run) {
    wait_until(
        "every process in the namespace to end",
        Duration::from_secs(10),
        || processes_with(&run.marker).is_empty(),
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    assert!(
        !mounts.contains("byok-node"),
        "a node mount is left: {mounts}"
    );
    let links = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        !links.contains("byok-node") && !links.contains("byok-cni-test"),
        "an interface is left on the host: {links}"
    );
    let _ = std::fs::remove_file(&run.ready);
}

/// One test, two runs in turn: both change the same global state.
#[test]
fn a_stopped_or_killed_node_run_leaves_the_machine_as_it_found_it() {
    if !nix_is_root() {
        eprintln!("skipped: needs root (namespaces, sysctls, cgroups)");
        return;
    }
    let before: Vec<String> = SYSCTLS.iter().map(|s| sysctl(s)).collect();
    assert_ne!(before[0], "77", "kernel.panic is already the test's value");
    let cgroup_existed = Path::new(CGROUP).exists();
    let dir = std::env::temp_dir();
    let mut run = start(&dir);
    assert_eq!(
        sysctl("kernel.panic"),
        "77",
        "the stand-in changed the sysctl"
    );

    Command::new("kill")
        .args(["-TERM", &run.child.id().to_string()])
        .status()
        .expect("kill");
    let status = run.child.wait().expect("waiting for the script");
    assert!(!status.success(), "a stopped run reports failure");
    assert_nothing_left(&run);
    let after: Vec<String> = SYSCTLS.iter().map(|s| sysctl(s)).collect();
    assert_eq!(after, before, "sysctls restored");
    if !cgroup_existed {
        assert!(!Path::new(CGROUP).exists(), "the cgroups are removed");
    }

    let mut run = start(&dir);
    // SIGKILL: no trap runs. The processes must still go (the kernel ends the namespace).
    run.child.kill().expect("SIGKILL");
    let _ = run.child.wait();
    assert_nothing_left(&run);
    // What only a trap can restore, `.ci/run`'s trap does; put it back here as it would.
    for (name, value) in SYSCTLS.iter().zip(&before) {
        let _ = Command::new("sysctl")
            .args(["-qw", &format!("{name}={value}")])
            .status();
    }
    if !cgroup_existed {
        wait_until(
            "the stand-in's cgroup to empty",
            Duration::from_secs(10),
            || {
                let _ = std::fs::remove_dir(format!("{CGROUP}/byok-teardown-test"));
                let _ = std::fs::remove_dir(CGROUP);
                !Path::new(CGROUP).exists()
            },
        );
    }
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
