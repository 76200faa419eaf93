//! Single-layer OCI image tarballs, written locally and imported into containerd: no registry
//! is reachable from the test machines, and none is needed for three tiny images.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::json;
use sha2::{Digest, Sha256};

/// One file, directory or symlink in an image's only layer.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
    },
    File {
        path: String,
        mode: u32,
        contents: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// What an image runs and what it contains.
#[derive(Debug, Clone)]
pub struct Image {
    /// e.g. `byok.dev/test/app:e2e`.
    pub name: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub entries: Vec<Entry>,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn layer_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match entry {
            Entry::Dir { path } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, path, std::io::empty())?;
            }
            Entry::File {
                path,
                mode,
                contents,
            } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(contents.len() as u64);
                tar.append_data(&mut header, path, contents.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                tar.append_link(&mut header, path, target)?;
            }
        }
    }
    Ok(tar.into_inner()?)
}

/// Writes `image` as an OCI image layout in a tar file at `out`, named (annotation
/// `io.containerd.image.name`) so that `ctr images import` registers it under its name.
pub fn write_image(image: &Image, out: &Path) -> anyhow::Result<()> {
    let layer = layer_tar(&image.entries)?;
    let layer_digest = digest(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "Cmd": image.cmd,
            "Env": image.env,
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(&manifest),
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": image.name,
                "org.opencontainers.image.ref.name": image.name.rsplit_once(':').map_or("latest", |(_, tag)| tag),
            },
        }],
    }))?;

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |path: &str, bytes: &[u8]| -> anyhow::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, path, bytes)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for blob in [&layer, &config, &manifest] {
        let name = digest(blob).replace("sha256:", "blobs/sha256/");
        add(&name, blob)?;
    }
    tar.into_inner()?.flush()?;
    Ok(())
}

/// Busybox (static) with a symlink per applet the tests use: enough to make HTTP calls on
/// loopback and to look around a container.
pub fn busybox_entries(busybox: &Path) -> anyhow::Result<Vec<Entry>> {
    let contents = std::fs::read(busybox)
        .with_context(|| format!("reading {} (Debian: busybox-static)", busybox.display()))?;
    let mut entries = vec![
        Entry::Dir { path: "bin".into() },
        Entry::Dir { path: "tmp".into() },
        Entry::Dir {
            path: "proc".into(),
        },
        Entry::Dir { path: "etc".into() },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            contents,
        },
    ];
    for applet in [
        "sh", "wget", "cat", "ls", "grep", "sleep", "echo", "env", "id", "test", "tr", "head",
        "find", "mount", "true", "false", "date", "seq", "wc",
    ] {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    Ok(entries)
}

/// Whether an ELF executable is static: it names no program interpreter (`PT_INTERP`), so
/// it needs no dynamic loader and no libraries (a static-pie still has `PT_DYNAMIC`).
pub fn is_static_elf(bytes: &[u8]) -> anyhow::Result<bool> {
    const PT_INTERP: u32 = 3;
    anyhow::ensure!(
        bytes.len() > 64 && bytes.starts_with(b"\x7fELF") && bytes[4] == 2 && bytes[5] == 1,
        "not a little-endian ELF64 file"
    );
    let u16_at = |at: usize| -> Option<u16> {
        Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
    };
    let phoff = bytes
        .get(0x20..0x28)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|o| usize::try_from(o).ok());
    let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, u16_at(0x36), u16_at(0x38)) else {
        anyhow::bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let at = phoff + i * usize::from(phentsize);
        let p_type = bytes
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| anyhow::anyhow!("truncated program headers"))?;
        if p_type == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A program and the shared libraries `ldd` says it loads, at their own paths (none for a
/// static program, such as the image's musl build).
pub fn program_entries(program: &Path, install_as: &str) -> anyhow::Result<Vec<Entry>> {
    let contents = std::fs::read(program)?;
    let is_static = is_static_elf(&contents)?;
    let mut entries = vec![Entry::File {
        path: install_as.trim_start_matches('/').into(),
        mode: 0o755,
        contents,
    }];
    if is_static {
        return Ok(entries);
    }
    let ldd = std::process::Command::new("ldd").arg(program).output()?;
    anyhow::ensure!(ldd.status.success(), "ldd {} failed", program.display());
    let mut dirs = std::collections::BTreeSet::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let real = std::fs::canonicalize(path)?;
        let mut dir = Path::new(path).parent();
        while let Some(d) = dir.filter(|d| *d != Path::new("/")) {
            dirs.insert(d.to_string_lossy().trim_start_matches('/').to_owned());
            dir = d.parent();
        }
        entries.push(Entry::File {
            path: path.trim_start_matches('/').into(),
            mode: 0o755,
            contents: std::fs::read(&real)?,
        });
    }
    let mut all: Vec<Entry> = dirs.into_iter().map(|path| Entry::Dir { path }).collect();
    all.append(&mut entries);
    Ok(all)
}
